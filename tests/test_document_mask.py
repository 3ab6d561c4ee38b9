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

The joint cost balancer (issue 22 item 4, ``parallel.cp_balance: cost``) in the same job:

- both engines' step at CP=2 with ``cp_balance: cost`` equals the reference too (every kind: the
  partition moves document pieces off zigzag's places, RoPE reads its token index, every layer gets
  the same ``partition=``), and the step reports its modelled imbalance, which reaches tensorboard
  (``cp/modelled_imbalance``; with ``train.time_attention`` the measured ``cp/attention_*`` spread
  over the CP ranks);
- on an S2 + softmax model (pattern SA) the same packed documents give zigzag a modelled imbalance
  > 1.2 and the cost balancer <= 1.05, and the cost-balanced CP=2 step's loss and every gradient
  equal the one-rank run's;
- with DP > 1 the logged ``cp/*`` values are the worst DP replica's (``loop.worst_over_dp`` on the
  same two ranks as 2 DP replicas).
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


def _engine_step(batch, extra: list[str], log_dir: str = "") -> tuple:
    """The engine's step: (loss, grad norm, modelled CP imbalance); with ``log_dir`` also the
    tensorboard scalars the loop's Logger writes for it (rank 0; attention timed)."""
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.engine import StepContext, engine_class
    from seqpar.train.loop import AttentionTimer, Logger

    cfg = _cfg(extra)
    engine_cls = engine_class(cfg.train.engine)
    engine_cls.check(cfg)
    par = cfg.parallel
    init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed)
    try:
        engine = engine_cls.build(cfg, VOCAB)
        engine.train()
        timer = AttentionTimer(engine.modules[0]) if log_dir else None
        b = batch.to(engine.device)
        res = engine.train_step(b if cfg.data.document_mask else b.whole_rows(), StepContext(0))
        scalars = None
        if log_dir:
            logger = Logger(cfg, pathlib.Path(log_dir), 0, device=engine.device)
            logger.log(0, res, 1.0, timer)
            if logger.writer is not None:
                logger.writer.close()
                from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

                acc = EventAccumulator(str(pathlib.Path(log_dir) / "tb"))
                acc.Reload()
                scalars = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("cp/")}
        engine.close()
        return res.loss, res.grad_norm, res.cp_imbalance, scalars
    finally:
        parallel_state.destroy_model_parallel()


SA = ["model.pattern=SA"]  # S2 + softmax layers (SASA)


def _balance_on_s2_softmax(batch) -> dict:
    """Pattern SA: the one-rank run (packed documents) against CP=2 with the cost balancer (loss sum
    and every gradient, summed over the CP ranks), and both balancers' modelled imbalance."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar import cp
    from seqpar.megatron import init_parallel
    from seqpar.train.runtime import CPBalance, build_model, forward_micro_batch, micro_batches, modelled_imbalance

    def run(cp_size: int, balance) -> tuple:
        model = build_model(cfg, VOCAB)[0]
        model.zero_grad()
        with cp.step_checks():
            micro = micro_batches(batch, 0, balance)
            loss = sum((forward_micro_batch(model, mb) * mb["loss_mask"]).sum() for mb in micro)
            loss.backward()
        g = _grads(model)
        total = loss.detach().clone()
        if cp_size > 1:
            group = parallel_state.get_context_parallel_group()
            dist.all_reduce(total, group=group)
            for v in g.values():
                dist.all_reduce(v, group=group)
        return total.item(), g, micro

    cfg = _cfg(SA)
    init_parallel(1, 1, 1, seed=cfg.train.seed)
    ref_loss, ref_grads, _ = run(1, CPBalance.of(cfg))
    parallel_state.destroy_model_parallel()
    cfg = _cfg(SA + ["parallel.context_parallel=2", "parallel.cp_balance=cost"])
    init_parallel(1, 2, 1, seed=cfg.train.seed)
    try:
        cost = CPBalance.of(cfg)
        zigzag = CPBalance("zigzag", cost.cost)
        loss, grads, micro = run(2, cost)
        zig_micro = micro_batches(batch, 0, zigzag)
        return {"ref": (ref_loss, ref_grads), "cost": (loss, grads), "balance": micro[0]["partition"].balance,
                "imbalance": {"zigzag": modelled_imbalance(zig_micro, zigzag),
                              "cost": modelled_imbalance(micro, cost)}}
    finally:
        parallel_state.destroy_model_parallel()


LAYOUTS = {
    "megatron-cp2": ["parallel.context_parallel=2"],
    "megatron-pp2": ["parallel.pipeline_parallel=2", "data.micro_batch=1"],
    "deepspeed-cp2": ["parallel.context_parallel=2", "train.engine=deepspeed"],
    "unmasked-cp2": ["parallel.context_parallel=2", "data.document_mask=false"],
    "megatron-cp2-cost": ["parallel.context_parallel=2", "parallel.cp_balance=cost"],
    "deepspeed-cp2-cost": ["parallel.context_parallel=2", "parallel.cp_balance=cost", "train.engine=deepspeed"],
}


def _worst_over_dp(rank: int) -> tuple:
    """``loop.worst_over_dp`` on 2 DP replicas (CP = 1 here: the function only reduces over DP):
    replica-dependent values -> the worst replica's on both ranks; None stays None."""
    import torch
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.loop import worst_over_dp

    init_parallel(1, 1, 1, seed=0)
    try:
        assert parallel_state.get_data_parallel_world_size() == 2
        mine = {"modelled_imbalance": [1.3, 1.05][rank], "attention_fwd_ms_max": [2.0, 5.0][rank],
                "attention_fwd_ms_mean": [1.0, 4.0][rank], "attention_imbalance": [2.0, 1.25][rank]}
        return (worst_over_dp(mine, torch.device("cpu")),
                worst_over_dp({"modelled_imbalance": 1.1 + rank}, torch.device("cpu")),
                worst_over_dp({"modelled_imbalance": None}, torch.device("cpu")))
    finally:
        parallel_state.destroy_model_parallel()


def _job(rank: int, world: int, log_dir: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat

    batch = _batch()
    try:
        out = {"ref": _reference(batch)}
        parallel_state.destroy_model_parallel()
        out["shared"] = _shared_path(batch)
        for name, extra in LAYOUTS.items():
            out[name] = _engine_step(batch, extra, log_dir if name == "megatron-cp2-cost" else "")
        out["sa"] = _balance_on_s2_softmax(batch)
        out["dp"] = _worst_over_dp(rank)
        return out
    finally:
        disable_cpu_compat()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(_job, 2, str(tmp_path_factory.mktemp("tb")), timeout=600)


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


@pytest.mark.parametrize("layout", ["megatron-cp2", "megatron-pp2", "deepspeed-cp2", "megatron-cp2-cost",
                                    "deepspeed-cp2-cost"])
def test_engine_step_masks_documents(runs, layout):
    ref = runs[0]["ref"]
    for res in runs:
        loss, grad_norm, _, _ = res[layout]
        assert loss == pytest.approx(ref["loss"], rel=1e-5)
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4)


def test_without_document_mask_documents_see_each_other(runs):
    ref = runs[0]["ref"]
    loss, _, _, _ = runs[0]["unmasked-cp2"]
    assert abs(loss - ref["loss"]) > 1e-3 * ref["loss"]


def test_cost_balancer_on_s2_softmax_is_balanced_and_exact(runs):
    import torch

    for res in runs:
        sa = res["sa"]
        assert sa["balance"] == "cost"
        assert sa["imbalance"]["zigzag"] > 1.2, sa["imbalance"]
        assert sa["imbalance"]["cost"] <= 1.05, sa["imbalance"]
        (ref_loss, ref_grads), (loss, grads) = sa["ref"], sa["cost"]
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert ref_grads.keys() == grads.keys()
        floor = 1e-6 * max(v.abs().max().item() for v in ref_grads.values())
        for k, want in ref_grads.items():
            err = (grads[k] - want).abs().max().item()
            assert err <= 1e-4 * want.abs().max().item() + floor, f"{k}: max error {err:.3g}"
        assert torch.isfinite(torch.tensor(loss))


def test_step_reports_the_modelled_imbalance_to_tensorboard(runs):
    _, _, zig, _ = runs[0]["megatron-cp2"]
    _, _, cost, scalars = runs[0]["megatron-cp2-cost"]
    _, _, ds_cost, _ = runs[0]["deepspeed-cp2-cost"]
    assert zig is not None and cost is not None and cost == ds_cost  # both engines, one placement
    assert cost <= zig and cost <= 1.05
    assert scalars["cp/modelled_imbalance"] == pytest.approx(cost, rel=1e-6)
    assert scalars["cp/attention_fwd_ms_max"] >= scalars["cp/attention_fwd_ms_mean"] > 0
    assert scalars["cp/attention_imbalance"] == pytest.approx(
        scalars["cp/attention_fwd_ms_max"] / scalars["cp/attention_fwd_ms_mean"], rel=1e-5)
    assert runs[1]["megatron-cp2-cost"][3] is None  # rank 1 writes no tensorboard


def test_cp_scalars_are_the_worst_dp_replicas(runs):
    for res in runs:
        full, only_modelled, none = res["dp"]
        assert full == {"modelled_imbalance": 1.3, "attention_fwd_ms_max": 5.0, "attention_fwd_ms_mean": 2.5,
                        "attention_imbalance": 2.0}
        assert only_modelled == {"modelled_imbalance": 2.1}
        assert none == {"modelled_imbalance": None}
