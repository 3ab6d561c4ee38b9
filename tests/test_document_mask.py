"""Document masking end to end (issue 23 item 4): a step on a batch of packed documents equals the
documents run alone, through both engines' real step at CP=2 and under PP.

One 2-rank job (tiny hybrid ASLH: softmax, S2, Lightning, MoH; fp32; documents of awkward lengths,
none a multiple of 2 x CP, two rows of different document structure):

- the reference: each document alone (its own sequence, positions from 0) through the bare one-rank
  model; the per-document loss sums and gradients;
- the shared micro-batch path of both engines (``seqpar.train.runtime.micro_batches`` +
  ``forward_micro_batch``) at CP=2: every document's loss and gradient (loss mask = that document)
  equal the reference's, and the two micro-batches get the same packed length (one pipeline shape);
- ``MegatronEngine.train_step`` at CP=2 and at PP=2 (two micro-batches through the 1F1B schedule) and
  ``DeepSpeedEngine.train_step`` at CP=2: the step's loss and gradient norm equal the reference's
  token-weighted mean; the same batch with ``data.document_mask: false`` (attention across documents,
  the old behaviour) does not.

MoH's load-balance loss is off: it is a statistic of the micro-batch's routing (of all its documents
together, by design), so it is not a per-document quantity; the MoH attention itself is.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVR = ["model.preset=tiny-hybrid", "data.dataset=mqar", "data.seq_len=32", "data.global_batch=2",
       "data.vocab_size=64", "data.mqar_pairs=4", "data.mqar_queries=4", "train.progress=false",
       "parallel.backend=torch", "train.time_attention=false", "model.s2_block_size=16",
       "model.s2_local_blocks=1", "model.s2_vert_stride=2", "parallel.context_parallel=1", "optim.grad_clip=0",
       # MoH's load-balance loss is a statistic of the whole micro-batch's routing, not per document
       "model.moh_aux_loss_coef=0"]
ROWS = [[7, 12, 13], [19, 13]]  # documents per row (seq_len 32); none a multiple of 2 x CP = 4
VOCAB = 64


def _batch():
    import torch

    from seqpar.data import Batch

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=g)
    labels = torch.randint(0, VOCAB, (2, 32), generator=g)
    mask = (torch.rand(2, 32, generator=g) > 0.15).float()
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    return Batch(tokens, labels, mask, pos)


def _docs():
    """(row, start, length) of every document."""
    out = []
    for r, row in enumerate(ROWS):
        start = 0
        for n in row:
            out.append((r, start, n))
            start += n
    return out


def _cfg(extra: list[str]):
    from seqpar.train.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", OVR + extra)


def _grads(model) -> dict:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _reference(batch) -> dict:
    """Each document alone through the one-rank model: per-document loss sums and gradients."""
    import torch

    from seqpar.megatron import init_parallel
    from seqpar.train.runtime import build_model

    cfg = _cfg([])
    init_parallel(1, 1, 1, seed=cfg.train.seed)
    model = build_model(cfg, VOCAB)[0]
    losses, grads = [], []
    for r, a, n in _docs():
        model.zero_grad()
        out = model(batch.tokens[r:r + 1, a:a + n], torch.arange(n)[None], None, labels=batch.labels[r:r + 1, a:a + n])
        loss = (out * batch.loss_mask[r:r + 1, a:a + n]).sum()
        loss.backward()
        losses.append(loss.item())
        grads.append(_grads(model))
    tokens = batch.loss_mask.sum().item()
    full = {k: sum(g[k] for g in grads) / tokens for k in grads[0]}
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in full.values())).item()
    return {"losses": losses, "grads": grads, "loss": sum(losses) / tokens, "grad_norm": norm}


def _shared_path(batch) -> dict:
    """CP=2, the engines' micro-batch path on a bare model: each document's loss sum and gradient
    (the gradient summed over the CP ranks, each rank's from its own tokens)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar import cp
    from seqpar.data import Batch
    from seqpar.megatron import init_parallel
    from seqpar.train.runtime import build_model, forward_micro_batch, micro_batches

    cfg = _cfg(["parallel.context_parallel=2"])
    init_parallel(1, 2, 1, seed=cfg.train.seed)
    model = build_model(cfg, VOCAB)[0]
    group = parallel_state.get_context_parallel_group()
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches(batch, 1)}
    losses, grads = [], []
    for r, a, n in _docs():
        mask = torch.zeros_like(batch.loss_mask)
        mask[r, a:a + n] = batch.loss_mask[r, a:a + n]
        model.zero_grad()
        with cp.step_checks():
            loss = sum((forward_micro_batch(model, mb) * mb["loss_mask"]).sum()
                       for mb in micro_batches(Batch(batch.tokens, batch.labels, mask, batch.position_ids), 1))
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        g = _grads(model)
        for v in g.values():
            dist.all_reduce(v, group=group)
        losses.append(total.item())
        grads.append(g)
    parallel_state.destroy_model_parallel()
    return {"losses": losses, "grads": grads, "shapes": shapes}


def _engine_step(batch, extra: list[str]) -> tuple[float, float]:
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.engine import StepContext, engine_class

    cfg = _cfg(extra)
    engine_cls = engine_class(cfg.train.engine)
    engine_cls.check(cfg)
    par = cfg.parallel
    init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed)
    try:
        engine = engine_cls.build(cfg, VOCAB)
        engine.train()
        b = batch.to(engine.device)
        res = engine.train_step(b if cfg.data.document_mask else b.whole_rows(), StepContext(0))
        engine.close()
        return res.loss, res.grad_norm
    finally:
        parallel_state.destroy_model_parallel()


LAYOUTS = {
    "megatron-cp2": ["parallel.context_parallel=2"],
    "megatron-pp2": ["parallel.pipeline_parallel=2", "data.micro_batch=1"],
    "deepspeed-cp2": ["parallel.context_parallel=2", "train.engine=deepspeed"],
    "unmasked-cp2": ["parallel.context_parallel=2", "data.document_mask=false"],
}


def _job(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat

    batch = _batch()
    try:
        out = {"ref": _reference(batch)}
        parallel_state.destroy_model_parallel()
        out["shared"] = _shared_path(batch)
        for name, extra in LAYOUTS.items():
            out[name] = _engine_step(batch, extra)
        return out
    finally:
        disable_cpu_compat()


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_job, 2, timeout=600)


def test_packed_documents_equal_documents_alone_at_cp2(runs):
    import torch

    ref = runs[0]["ref"]
    for res in runs:
        shared = res["shared"]
        assert len(shared["shapes"]) == 1  # one activation shape for every micro-batch of the step
        for d, (want, got) in enumerate(zip(ref["losses"], shared["losses"])):
            assert got == pytest.approx(want, rel=1e-5), f"document {d}"
        for d, (want, got) in enumerate(zip(ref["grads"], shared["grads"])):
            assert want.keys() == got.keys()
            floor = 1e-6 * max(v.abs().max().item() for v in want.values())  # fp32 noise of the whole gradient
            for k in want:
                scale = want[k].abs().max().item()
                err = (got[k] - want[k]).abs().max().item()
                assert err <= 1e-4 * scale + floor, f"document {d} {k}: max error {err:.3g}, max |grad| {scale:.3g}"


@pytest.mark.parametrize("layout", ["megatron-cp2", "megatron-pp2", "deepspeed-cp2"])
def test_engine_step_masks_documents(runs, layout):
    ref = runs[0]["ref"]
    for res in runs:
        loss, grad_norm = res[layout]
        assert loss == pytest.approx(ref["loss"], rel=1e-5)
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)


def test_without_document_mask_documents_see_each_other(runs):
    ref = runs[0]["ref"]
    loss, _ = runs[0]["unmasked-cp2"]
    assert abs(loss - ref["loss"]) > 1e-3 * ref["loss"]
