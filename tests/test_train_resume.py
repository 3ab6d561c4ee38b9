"""The loop on 2 gloo ranks with CP=2 (fp32, and bf16 with fp32 master weights): the loss falls; stop + --resume gives exactly the losses of an
uninterrupted run; checkpoints are complete folders (no temp left) and ``latest`` points at them."""

from __future__ import annotations

import pathlib

import pytest

from cp_harness import run_ranks

OVR = ["model.preset=tiny-hybrid", "parallel.context_parallel=2", "data.dataset=mqar", "data.seq_len=64",
       "data.global_batch=4", "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4",
       "train.steps=8", "optim.warmup_steps=2", "train.progress=false", "parallel.backend=torch"]


def _train(rank: int, world: int, out: str, plan: list, dtype: str = "fp32"):
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = load_recipe(root / "recipes" / "tiny_hybrid_cp2.yaml", OVR + [f"train.out_dir={out}", f"model.dtype={dtype}"])
    losses = []
    for resume, stop in plan:
        losses.append(train(cfg, resume=resume, stop_after=stop))
    disable_cpu_compat()
    return losses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_with_identical_losses(tmp_path, dtype):
    full = run_ranks(_train, 2, str(tmp_path / "a"), [(False, None)], dtype, timeout=300)
    parts = run_ranks(_train, 2, str(tmp_path / "b"), [(False, 3), (True, 2), (True, None)], dtype, timeout=300)
    for rank in range(2):
        assert full[rank][0] == full[0][0]  # every rank reports the same global loss
        assert [x for run in parts[rank] for x in run] == full[rank][0]
    assert [len(r) for r in parts[0]] == [3, 2, 3]
    losses = full[0][0]
    assert losses[-1] < losses[0]
    ck = tmp_path / "b" / "checkpoints"
    assert (ck / "latest").read_text() == "step_0000008"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_0000003", "step_0000005", "step_0000008"]
    assert (ck / "step_0000008" / "metadata.json").is_file()  # a dist_checkpointing folder
    assert list((tmp_path / "b" / "tb").glob("events.out.tfevents.*"))
