"""NaN / inf (issue #16): a diverging run (optim.lr=1e6) stops at the first non-finite step with a
message naming the step, the rank and where it went non-finite — also with MoH layers, whose NaN
gates used to surface as the kernel's "gates must be >= 0" — or skips up to
train.skip_nonfinite_steps steps first; no checkpoint of non-finite weights is written; the CLI
exits 3."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny", "data.dataset=mqar", "data.seq_len=32", "data.global_batch=2", "data.vocab_size=64",
       "data.mqar_pairs=4", "data.mqar_queries=4", "optim.warmup_steps=1", "train.progress=false",
       "parallel.backend=torch", "parallel.context_parallel=1", "train.steps=6", "optim.lr=1e6",
       "train.save_every=1"]


def _diverge(rank: int, world: int, out: str):
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    res = []
    for i, extra in enumerate([["model.pattern=A", "train.debug_nonfinite=true"], ["model.pattern=H"],
                               ["model.pattern=A", "train.skip_nonfinite_steps=2"]]):
        cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + extra + [f"train.out_dir={out}/{i}"])
        try:
            train(cfg)
            res.append(None)
        except Exception as e:  # noqa: BLE001
            res.append((type(e).__name__, str(e), getattr(e, "step", None)))
            parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return res


def test_diverging_run_stops_names_step_rank_layer(tmp_path):
    dense, moh, skipped = run_ranks(_diverge, 1, str(tmp_path), timeout=300)[0]
    assert dense[0] == "NonFiniteError" and dense[2] == 3, dense
    # where the divergence shows first depends on the optimizer's trajectory (megatron's AdamW: the grad
    # norm goes non-finite before the loss); the message names the step, the rank and the place
    assert dense[1].startswith("step 3: non-finite ") and " on rank 0" in dense[1], dense
    assert ("first non-finite output: decoder.layers.0.self_attention.core_attention (softmax attention)" in dense[1]
            or ("every layer's forward output was finite" in dense[1]
                and "first non-finite gradient: embedding.word_embeddings.weight" in dense[1])), dense
    # MoH: the NaN message with its step, not the kernel's input check
    assert moh[0] == "NonFiniteError" and moh[1].startswith("step 3: non-finite") and " on rank 0" in moh[1], moh
    if moh[1].startswith("step 3: non-finite values"):  # the forward failed: the NaN gates are named
        assert "(moh router gates)" in moh[1]
    assert "gates must be >= 0" not in moh[1]
    assert skipped[0] == "NonFiniteError" and skipped[2] == 5 and "after 2 skipped step(s)" in skipped[1], skipped
    # only finite weights were saved (skipped steps 3, 4 kept step 2's weights); latest = the last finite one
    for i, last in ((0, 2), (1, 2), (2, 4)):
        ck = tmp_path / str(i) / "checkpoints"
        assert sorted(p.name for p in ck.glob("step_*")) == [f"step_{s:07d}" for s in range(1, last + 1)]
        assert (ck / "latest").read_text() == f"step_{last:07d}"


def test_check_skips_up_to_the_limit():
    from seqpar.train.health import HealthMonitor, NonFiniteError

    m = HealthMonitor(torch.nn.Linear(2, 2), skip_limit=2)
    assert m.check(0, 1.0, 2.0)
    assert not m.check(1, math.nan, 1.0) and not m.check(2, 1.0, math.inf) and m.skipped == 2
    assert m.check(3, 1.0, 1.0)
    with pytest.raises(NonFiniteError, match=r"^step 5: non-finite loss=-inf, grad norm=1.0 on rank 0 after 2"):
        m.check(4, -math.inf, 1.0)
    with pytest.raises(NonFiniteError, match=r"train\.skip_nonfinite_steps=0"):
        HealthMonitor(torch.nn.Linear(2, 2)).check(0, math.nan, math.nan)


def _save_nan(rank: int, world: int, out: str):
    from seqpar.train.checkpoint import NonFiniteCheckpointError, save

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = math.inf
    try:
        save(out, 7, [model], None, rng=None, config={})
    except NonFiniteCheckpointError as e:
        return str(e)


def test_save_refuses_nonfinite_weights(tmp_path):
    msg = run_ranks(_save_nan, 1, str(tmp_path / "ck"), timeout=60)[0]
    assert msg.startswith("refusing to save step 7: the weights are not finite (rank 0, first: weight)"), msg
    assert not (tmp_path / "ck").exists()


def test_cli_exits_3_with_one_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    args = [a for o in OVR + ["model.pattern=H", f"train.out_dir={tmp_path}"] for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "seqpar.train", str(ROOT / "recipes" / "tiny_hybrid_cp2.yaml"), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert r.stderr.count("seqpar-train: step 3: non-finite ") == 1 and "Traceback" not in r.stderr
