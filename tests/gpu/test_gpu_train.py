"""One-rank NCCL training steps of every recipe's model at tiny width, through the real launcher path.

Each recipe in recipes/ runs as ``torchrun --standalone --nproc_per_node 1 -m seqpar.train RECIPE``
(torchrun picks a free port) with overrides that keep its attention pattern, dtype and CP schemes
but shrink the model to tiny width, the run to 3 steps and the layout to one rank (TP = CP = 1):
every collective still goes through NCCL at world 1, every tensor that reaches one must be on the
GPU, and the loss must be finite.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from gpu_common import CUDA, seq

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

TINY = [
    "model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=256", "parallel.tensor_parallel=1", "parallel.context_parallel=1",
    "parallel.usp_ulysses_degree=1",
    "data.global_batch=2", "data.vocab_size=512", "data.max_bytes=300000", "train.steps=3",
    "train.save_every=0", "train.log_every=1", "train.progress=false",
]
# recipes that read a preprocessed corpus (125m, 7b, tiny_data) train on the demo text data here
FROM_CORPUS = ["data.dataset=text", "data.tokenizer=train", "data.blend=[]", "data.split=null"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_model_trains_three_steps_on_one_nccl_rank(recipe, tmp_path):
    n = seq(2048 if CUDA else 4096)   # a multiple of every recipe's S2 block size
    overrides = TINY + [f"data.seq_len={n}", f"train.out_dir={tmp_path / 'run'}",
                        f"data.cache_dir={tmp_path / 'cache'}"]
    if "dataset: indexed" in recipe.read_text():
        overrides += FROM_CORPUS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "seqpar.train", str(recipe)]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None) if CUDA else env.setdefault("TRITON_INTERPRET", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"loss ([-+0-9.eE]+|nan|inf)\b.*-> ([-+0-9.eE]+|nan|inf)", out)
    assert summary, out[-3000:]
    assert all(math.isfinite(float(x)) for x in summary.groups()), summary.group(0)
