"""A tiny one-process training run for tests that need a real checkpoint (export clients, export errors)."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_tiny(rank: int, world: int, out: str, preset: str, steps: int) -> None:
    """Train ``preset`` for ``steps`` steps (seq 32, batch 2, vocab 512, CP=1) into ``out``; run it
    with ``cp_harness.run_ranks(train_tiny, 1, out, preset, steps)``."""
    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import train

    ovr = [f"model.preset={preset}", "data.seq_len=32", "data.global_batch=2", "data.vocab_size=512",
           "data.max_bytes=40000", f"train.steps={steps}", "optim.warmup_steps=1", "train.progress=false",
           "train.time_attention=false", "parallel.backend=torch", "parallel.context_parallel=1",
           f"train.out_dir={out}", f"data.cache_dir={out}/spm"]
    train(load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", ovr))
    disable_cpu_compat()
