"""Megatron-core GPTModel with seqpar layers on 2 gloo ranks: pattern "ASLH" (all four kinds) with
CP=2 (Megatron's zigzag split, each kind under its scheme), DP=2 with uneven valid tokens, and TP=2
give the loss and gradients of the single-replica run on the same global batch.

The reference runs the full batch on both ranks as DP=2 replicas: with the token-weighted loss and
the summed gradients that is exactly the single-device loss and gradient. Every model runs in
megatron-core DDP (bucketed fp32 reduction over DP x CP, overlapped with backward) through the
engine's ``forward_backward`` (megatron's schedule); gradients are read from DDP's ``main_grad``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cp_harness import run_ranks
from tp_shards import full_grads, load_shards

SEQ, BATCH, VOCAB = 64, 2, 96


def _build(pattern: str, tp: int, cp: int, schemes: dict, aux_coef: float, seed: int = 7):
    schemes = dict(schemes)
    degree = schemes.pop("usp_ulysses_degree", 1)
    stride = schemes.pop("s2_vert_stride", 2)
    from seqpar.megatron import init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    init_parallel(tp, cp, seed=seed)
    p = replace(preset("tiny"), pattern=pattern)
    cfg = transformer_config(p, tensor_model_parallel_size=tp, context_parallel_size=cp, cp_schemes=schemes,
                             usp_ulysses_degree=degree if cp > 1 else 1,
                             seqpar_backend="torch", s2_block_size=16, s2_local_blocks=1, s2_vert_stride=stride,
                             moh_aux_loss_coef=aux_coef,                              params_dtype=torch.float32)
    torch.manual_seed(seed)
    cfg.calculate_per_token_loss = True
    return build_gpt(p, cfg, vocab_size=VOCAB, max_sequence_length=SEQ)


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallelConfig

    from seqpar.train.megatron_engine import ddp_wrap

    return ddp_wrap([model], DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True))


def _data():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(BATCH, SEQ)
    mask[0, 40:] = 0   # padding: uneven valid tokens across rows, DP ranks and CP chunks
    mask[1, :5] = 0
    return tokens, labels, mask








def _run(rank: int, world: int, pattern: str, schemes: dict, runs: tuple):
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat
    from seqpar.train.runtime import local_batch
    from seqpar.train.step import forward_backward

    tokens, labels, mask = _data()
    full = {"tokens": tokens, "labels": labels, "loss_mask": mask}
    # name -> (tp, cp, MoH aux coefficient). The load-balance loss is per DP replica (as megatron's
    # MoE aux loss per micro-batch), so the DP comparison runs without it; CP makes it global.
    sizes = {"ref": (1, 1, 0.01), "cp2": (1, 2, 0.01), "ref_noaux": (1, 1, 0.0), "dp2": (1, 1, 0.0),
             "tp2": (2, 1, 0.01)}
    out = {}
    full_weights = None
    for name in runs:
        tp, cp, aux = sizes[name]
        model = _build(pattern, tp, cp, schemes, aux)
        if full_weights is None:
            full_weights = {k: v.detach().clone() for k, v in model.named_parameters()}
        elif tp > 1:
            load_shards(model, full_weights, tp, parallel_state.get_tensor_model_parallel_rank())
        if name == "dp2":
            sl = slice(rank, rank + 1)
            batch = {k: v[sl] for k, v in full.items()}
        else:
            batch = local_batch(dict(full)["tokens"], labels, mask) if cp > 1 else full
        res = forward_backward(_ddp(model), [batch])
        out[name] = (res.loss, res.aux_loss, res.tokens, full_grads(model, tp, "main_grad"))
        parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return out


def _compare(results, pairs):
    valid = BATCH * SEQ - 24 - 5
    for rank_out in results:
        for name, ref in pairs:
            ref_loss, ref_aux, ref_tokens, ref_grads = rank_out[ref]
            assert ref_tokens == 2 * valid  # the reference batch is counted once per replica
            loss, aux, tokens, grads = rank_out[name]
            assert tokens == valid, name
            assert loss == pytest.approx(ref_loss, rel=1e-5), name
            assert aux == pytest.approx(ref_aux, rel=1e-5, abs=1e-9), name
            assert grads.keys() == ref_grads.keys()
            for key in ref_grads:
                scale = ref_grads[key].abs().max().item() + 1e-12
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: {key}")
            assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("schemes", [
    {"softmax": "allgather", "s2": "allgather", "lightning": "allgather", "moh": "allgather"},
    {"softmax": "ring", "s2": "ring", "lightning": "ulysses", "moh": "ulysses"},
    {"softmax": "ulysses", "s2": "ulysses", "lightning": "ring", "moh": "ring"},
    {"softmax": "usp", "s2": "usp", "lightning": "usp", "moh": "usp", "usp_ulysses_degree": 2},
], ids=["allgather", "ring-ulysses", "ulysses-ring", "usp"])
def test_hybrid_cp2_and_dp2_match_single_rank(schemes):
    runs = ("ref", "cp2", "ref_noaux", "dp2")
    results = run_ranks(_run, 2, "ASLH", schemes, runs, timeout=300)
    assert results[0]["ref"][1] > 0  # the MoH aux loss is present
    _compare(results, [("cp2", "ref"), ("dp2", "ref_noaux")])


def test_tp2_matches_single_rank():
    # vert_stride 4 over 4 heads: the stride step of a rank's 2 heads (2) differs from the model's
    # (1), so S2 must place the rank's kv heads in the global pattern; MoH (H) routes over all 4
    # heads on both ranks (the routing and the balance loss of TP=1), each rank computes its 2
    runs = ("ref", "tp2")
    results = run_ranks(_run, 2, "ASLH", {"s2_vert_stride": 4}, runs, timeout=300)
    assert results[0]["ref"][1] > 0  # the MoH aux loss is present
    _compare(results, [("tp2", "ref")])
