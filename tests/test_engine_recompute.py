"""model.recompute (megatron's recompute_granularity / recompute_method) leaves the training losses and
grad norms unchanged, and really recomputes: with "full" every attention module runs its forward
twice per micro-batch (forward + the recompute in backward), with "selective" the core attention of
A/S layers does; "none" runs each once. Also: ``selective`` with a kind it cannot recompute is a recipe
error naming the field and the fix."""

from __future__ import annotations

import pathlib

import pytest

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["data.dataset=mqar", "data.seq_len=64", "data.global_batch=2", "data.vocab_size=64", "data.mqar_pairs=4",
        "data.mqar_queries=4", "optim.warmup_steps=1", "optim.lr=1e-2", "train.progress=false",
        "parallel.backend=torch", "parallel.context_parallel=1", "model.preset=tiny"]


def _steps(rank: int, world: int, overrides: list[str]):
    from megatron.core import parallel_state

    from seqpar.megatron import SoftmaxCoreAttention, disable_cpu_compat, init_parallel
    from seqpar.megatron.attention import LightningSelfAttention
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.megatron_engine import build_engine, train_step
    from seqpar.train.runtime import param_device

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + overrides)
    init_parallel(1, 1, seed=cfg.train.seed)
    try:
        data, vocab = build_data(cfg)
        engine = build_engine(cfg, vocab)
        calls = {"softmax": 0, "lightning": 0}
        for mod in engine.model[0].modules():
            kind = ("softmax" if isinstance(mod, SoftmaxCoreAttention) else
                    "lightning" if isinstance(mod, LightningSelfAttention) else None)
            if kind:
                mod.register_forward_hook(lambda m, i, o, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
        out = []
        for step in range(3):
            res = train_step(engine, *_batch(data, step, cfg, param_device(engine.model)))
            out.append((res.loss, res.grad_norm))
        return out, calls
    finally:
        parallel_state.destroy_model_parallel()
        disable_cpu_compat()


@pytest.mark.parametrize("pattern,mode,factor", [("ASLH", "full", 2), ("AS", "selective", 2)], ids=["full", "selective"])
def test_recompute_keeps_losses_and_reruns_forward(pattern, mode, factor):
    ref, ref_calls = run_ranks(_steps, 1, [f"model.pattern={pattern}"], timeout=300)[0]
    got, calls = run_ranks(_steps, 1, [f"model.pattern={pattern}", f"model.recompute={mode}"], timeout=300)[0]
    for (loss, gn), (rloss, rgn) in zip(got, ref):
        assert loss == pytest.approx(rloss, rel=1e-6) and gn == pytest.approx(rgn, rel=1e-5), (got, ref)
    # 4 layers tiled from the pattern, 3 steps x 1 micro-batch
    assert ref_calls["softmax"] > 0 and calls["softmax"] == factor * ref_calls["softmax"]
    if "L" in pattern:
        assert calls["lightning"] == factor * ref_calls["lightning"] > 0


def test_selective_recompute_rejects_kinds_it_cannot_rerun():
    from seqpar.train.config import load_recipe

    with pytest.raises(ValueError, match=r"model\.recompute='selective'.*\['H', 'L'\].*model\.recompute='full'"):
        load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + ["model.pattern=ASLH", "model.recompute=selective"])
