"""S2 under TP x CP with GQA: a megatron-core GPTModel of S2 layers at TP=2 x CP=2 (4 gloo ranks)
gives the loss and gradients of the 1-rank model, under every CP scheme, for strides whose head
rotation step differs between a TP rank's heads and the whole model's — under either reading of the
step (kv heads or query heads). Each TP rank's kv heads must sit at their global index in the pattern.

(TP=2 x CP=2 x DP=2 with S2 layers among the others: tests/test_engine_layouts.py, 8 ranks.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cp_harness import run_ranks
from tp_shards import full_grads, load_shards

SEQ, BATCH, VOCAB = 128, 2, 64
HEADS, KV_HEADS = 8, 4  # TP=2: 4 q heads / 2 kv heads per rank


def _build(tp: int, cp: int, scheme: str, vert_stride: int):
    from seqpar.megatron import init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    init_parallel(tp, cp, seed=5)
    p = replace(preset("tiny"), pattern="S", num_layers=2, num_attention_heads=HEADS, num_query_groups=KV_HEADS)
    cfg = transformer_config(p, tensor_model_parallel_size=tp, context_parallel_size=cp,
                             cp_schemes={"s2": scheme}, usp_ulysses_degree=2 if scheme == "usp" else 1,
                             seqpar_backend="torch", s2_block_size=16, s2_local_blocks=1,
                             s2_vert_stride=vert_stride, params_dtype=torch.float32)
    torch.manual_seed(5)
    return build_gpt(p, cfg, vocab_size=VOCAB, max_sequence_length=SEQ)




def _loss_and_grads(model, tokens, labels, cp: int) -> tuple[float, dict]:
    """Summed token loss of the global batch and its gradients (summed over the CP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {"tokens": tokens, "labels": labels}
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch)
    pos = torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"])
    loss = model(batch["tokens"], pos, None, labels=batch["labels"]).float().sum()
    loss.backward()
    total = loss.detach().clone()
    if cp > 1:
        group = parallel_state.get_context_parallel_group()
        dist.all_reduce(total, group=group)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
    return float(total), full_grads(model, parallel_state.get_tensor_model_parallel_world_size())


def _run(rank: int, world: int, runs: tuple) -> dict:
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    out, ref_weights = {}, {}
    for vert_stride, scheme in runs:
        if vert_stride not in ref_weights:
            model = _build(1, 1, "allgather", vert_stride)  # 1-rank model (each rank runs it whole)
            ref_weights[vert_stride] = {k: v.detach().clone() for k, v in model.named_parameters()}
            out[(vert_stride, "ref")] = _loss_and_grads(model, tokens, labels, 1)
            parallel_state.destroy_model_parallel()
        model = _build(2, 2, scheme, vert_stride)
        load_shards(model, ref_weights[vert_stride], 2, parallel_state.get_tensor_model_parallel_rank())
        out[(vert_stride, scheme)] = _loss_and_grads(model, tokens, labels, 2)
        parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return out


def test_s2_gqa_tp2_cp2_matches_single_rank():
    # vert_stride 4: kv-head step 1 (model) vs 2 (rank), query-head step 1 vs 1;
    # vert_stride 8: kv-head step 2 vs 4, query-head step 1 vs 2 — both differ per TP rank
    schemes = ("allgather", "ring", "ulysses", "usp")
    runs = tuple((vs, s) for vs in (4, 8) for s in schemes)
    results = run_ranks(_run, 4, runs, timeout=900)
    for rank_out in results:
        for vert_stride, scheme in runs:
            ref_loss, ref_grads = rank_out[(vert_stride, "ref")]
            loss, grads = rank_out[(vert_stride, scheme)]
            assert loss == pytest.approx(ref_loss, rel=1e-5), (vert_stride, scheme)
            assert grads.keys() == ref_grads.keys()
            for key in ref_grads:
                scale = ref_grads[key].abs().max().item() + 1e-12
                torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-5 * scale,
                                           msg=f"vert_stride {vert_stride}, {scheme}: {key}")
