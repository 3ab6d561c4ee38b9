"""seqpar.train: typed configs, CLI (python -m seqpar.train RECIPE.yaml), the one training loop over an
engine interface (engine.py; the Megatron engine in megatron_engine.py), checkpoints, tensorboard."""
