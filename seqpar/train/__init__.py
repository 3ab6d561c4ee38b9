"""seqpar.train: typed configs, CLI (python -m seqpar.train RECIPE.yaml), loop, checkpoints, tensorboard."""
