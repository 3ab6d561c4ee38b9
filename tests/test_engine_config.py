"""Engine options in the recipe: bad input is one error naming the field and the fix, raised before any
process group (the CLI exits 2 on every rank, nothing started); ``--dry-run`` reports the per-rank
parameter, gradient and optimizer-state bytes of the 7b recipe's layouts without launching them,
equal to the closed form (seqpar.train.memory)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "tiny_hybrid_cp2.yaml"


@pytest.mark.parametrize("overrides,world,match", [
    (["parallel.pipeline_parallel=3"], None,
     r"parallel\.pipeline_parallel=3 must divide the 4 layers; use a divisor of 4"),
    (["data.micro_batch=3"], 2, r"data\.micro_batch=3 must divide the sequences per DP rank.*use a divisor of 8"),
    (["model.recompute=selective"], None,
     r"model\.recompute='selective' recomputes the core attention of A/S layers only.*use model\.recompute='full'"),
    (["model.recompute=partial"], None, r"model\.recompute: got 'partial'.*'none', 'selective', 'full'"),
    (["parallel.pipeline_parallel=2"], 6, r"world size 6 is not divisible by parallel\.tensor_parallel x "
                                          r"parallel\.context_parallel x parallel\.pipeline_parallel = 4"),
    (["optim.distributed=2"], None, r"optim\.distributed: got 2"),
])
def test_bad_engine_options_name_the_field_and_the_fix(overrides, world, match):
    from seqpar.train.config import load_recipe

    with pytest.raises(ValueError, match=match):
        cfg = load_recipe(DEMO, overrides)
        if world is not None:
            cfg.check_world(world)


def test_cli_refuses_bad_layout_before_any_process_group(tmp_path):
    # a rank of a torchrun world: exit 2 with the field named, before init_process_group (no rendezvous
    # at MASTER_ADDR:1 is ever contacted)
    env = {**os.environ, "WORLD_SIZE": "6", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "seqpar.train", str(DEMO), "--set", "parallel.pipeline_parallel=2",
                          "--set", f"train.out_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "parallel.pipeline_parallel = 4" in out.stderr
    assert not list(tmp_path.iterdir())


def _dry_run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "seqpar.train", str(ROOT / "recipes" / "7b_lightning_cp8.yaml"),
                          "--dry-run", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"dry_run"')))


def test_dry_run_7b_reports_per_rank_bytes_matching_the_closed_form():
    from seqpar.train.memory import bytes_per_param

    # the recipe's layout (TP=2 x CP=8, DP=1) and one with PP=2 and DP=2 (64 ranks): built in one process
    for args, (tp, pp, cp, dp) in ((("--world", "16"), (2, 1, 8, 1)),
                                   (("--world", "64", "--set", "parallel.pipeline_parallel=2",
                                     "--set", "data.global_batch=2"), (2, 2, 8, 2))):
        rep = _dry_run(*args)
        assert (rep["tensor_parallel"], rep["pipeline_parallel"], rep["context_parallel"],
                rep["data_parallel"]) == (tp, pp, cp, dp)
        assert rep["distributed_optimizer"] is True  # DP x CP > 1
        assert len(rep["shards"]) == tp * pp  # one per distinct (stage, TP rank)
        pb, gb, ob = bytes_per_param(True, True, dp * cp)
        assert (pb, gb, ob) == (2, 4, 12 / (dp * cp))  # bf16 params, fp32 grads, 12 B / (DP x CP) of Adam
        for s in rep["shards"]:
            n = s["params"]
            assert n == s["params_closed_form"] > 0
            assert (s["param_bytes"], s["grad_bytes"], s["optimizer_bytes"]) == (2 * n, 4 * n, round(n * ob))
        stages = sum(s["params"] for s in rep["shards"] if s["tp_rank"] == 0)
        assert 6.0e9 < stages * tp < 7.5e9  # a 7B-class model
