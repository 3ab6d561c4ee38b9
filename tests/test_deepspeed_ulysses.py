"""DeepSpeed's own Ulysses is the anchor for head sharding: ``deepspeed.sequence.layer.DistributedAttention``
wrapping a plain causal softmax and our ``cp.attention(kind="softmax", scheme="ulysses")`` on the same
inputs give the same outputs and the same input gradients (dq, dk, dv), and both equal the single-rank
fp64 reference (flash-attn's rule: within 2x / 3x of the fp32 reference's own error).

One launch of 4 gloo ranks covers P = 4 (the world) and P = 2 (two groups of 2 ranks, each its own
Ulysses group, as CP groups sit inside a larger job). Shapes are awkward on purpose: sequence lengths
that are not powers of two, batch 2, GQA (query heads a multiple of the kv heads), both DeepSpeed
layouts (``batch_dim_idx=0``: ``[b, s, h, d]`` with ``scatter_idx=2, gather_idx=1``;
``batch_dim_idx=1``: ``[s, b, h, d]`` with DeepSpeed's defaults ``scatter_idx=2, gather_idx=0``).

- DeepSpeed shards the sequence contiguously (rank r holds tokens ``r N/P ..``); ours runs both
  ``balance="contiguous"`` and ``"zigzag"`` (the load-balanced causal layout DeepSpeed's Ulysses has
  no notion of: its local attention sees the gathered chunks in rank order).
- DeepSpeed wrapping *our* local kernel (``kernels.flash_attention``, torch backend) is bitwise equal to
  ours: the all-to-alls of both move the same heads to the same ranks. DeepSpeed wrapping torch SDPA
  (what a DeepSpeed user writes) equals the fp64 reference within the rule.
- GQA with fewer kv heads than ranks (here MQA at P = 2, kv heads 2 at P = 4): DeepSpeed's
  DistributedAttention refuses it (an AssertionError: "must be at least the sequence parallel size");
  ours replicates the kv heads and equals the reference, gradients of the replicas summed.
- S2 (P = 2, 2 kv heads, the last one dense): DeepSpeed calls its local attention without the rank's
  head index, so a wrapped ``s2_attention`` runs each rank's heads as if they were the whole model (each
  rank's one kv head taken as the dense one) and misses the reference; ours places each rank's heads in the model's pattern (== reference), and DeepSpeed
  wrapping the kernel *with* the global head offset ours passes is bitwise equal to ours.
- What DeepSpeed has and ours does not: 3 heads on 2 ranks (DeepSpeed splits them 2 + 1 and equals the
  reference; ours raises a ValueError asking for ``H % P == 0``).
"""

from __future__ import annotations

import os

import pytest
import torch

from cp_harness import run_ranks
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

# name, batch, global seq (N), query heads, kv heads, head dim
CASES = {
    4: [("mha", 2, 4 * 2 * 5, 4, 4, 16), ("gqa", 1, 4 * 2 * 7, 8, 4, 16), ("mqa-refused", 1, 4 * 2 * 3, 4, 2, 16)],
    2: [("gqa", 2, 2 * 2 * 7, 6, 2, 16), ("mha-sbhd", 1, 2 * 2 * 9, 4, 4, 32), ("mqa-refused", 2, 2 * 2 * 5, 4, 1, 16)],
}


def _inputs(seed: int, b: int, n: int, h: int, hkv: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(b, n, h, d, generator=g), "k": torch.randn(b, n, hkv, d, generator=g),
            "v": torch.randn(b, n, hkv, d, generator=g), "go": torch.randn(b, n, h, d, generator=g)}


def _grads(fn, t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fn(q, k, v) -> o; returns o and dq/dk/dv of sum(o * go), inputs cast to ``dtype``."""
    leaves = {n: t[n].detach().to(dtype).clone().requires_grad_() for n in ("q", "k", "v")}
    o = fn(leaves["q"], leaves["k"], leaves["v"])
    (o.double() * t["go"].double()).sum().backward()
    return {"o": o.detach(), **{f"d{n}": x.grad for n, x in leaves.items()}}


def _sdpa(q, k, v):
    """What a DeepSpeed user wraps: causal torch SDPA on ``[b, s, h, d]`` (GQA by repeated kv heads)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True)
    return o.transpose(1, 2)


def _ours_local(q, k, v):
    from seqpar.kernels import flash_attention

    return flash_attention(q, k, v, causal=True, backend="torch")


S2_CASE = (1, 2 * 2 * 24, 4, 2, 16)  # P = 2: batch, N (6 blocks of 16), heads, kv heads, head dim


def _s2_layout():
    from seqpar.kernels import S2Layout

    return S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1)


def _job(rank: int, world: int) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(rank))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from seqpar import cp
    from seqpar.kernels.s2.reference import attention_reference

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2]}
    out = {}
    for p, cases in CASES.items():
        group = groups[p]
        for i, (name, b, n, h, hkv, d) in enumerate(cases):
            t = _inputs(100 * p + i, b, n, h, hkv, d)
            res: dict = {}
            ref = lambda q, k, v: attention_reference(q, k, v, causal=True)[0]  # noqa: E731
            for tag, dtype in (("ref64", torch.float64), ("ref32", torch.float32)):
                full = _grads(ref, t, dtype)
                res[tag] = {bal: {key: cp.shard(x, group, dim=1, balance=bal) for key, x in full.items()}
                            for bal in ("contiguous", "zigzag")}
            for bal in ("contiguous", "zigzag"):
                loc = {key: cp.shard(x, group, dim=1, balance=bal) for key, x in t.items()}
                res[f"ours-{bal}"] = _grads(lambda q, k, v: cp.attention(  # noqa: B023
                    q, k, v, kind="softmax", scheme="ulysses", group=group, balance=bal, backend="torch"),
                    loc, torch.float32)
            loc = {key: cp.shard(x, group, dim=1, balance="contiguous") for key, x in t.items()}
            sbhd = name.endswith("sbhd")
            for tag, local_attn in (("ds-sdpa", _sdpa), ("ds-ours-local", _ours_local)):
                if sbhd:  # DeepSpeed's sequence-first layout, its default scatter/gather dims
                    attn = DistributedAttention(lambda q, k, v, f=local_attn: f(*(x.transpose(0, 1) for x in (q, k, v)))
                                                .transpose(0, 1), group, scatter_idx=2, gather_idx=0)
                    fn = lambda q, k, v, a=attn: a(*(x.transpose(0, 1) for x in (q, k, v)), 1).transpose(0, 1)  # noqa: E731
                else:
                    attn = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=1)
                    fn = lambda q, k, v, a=attn: a(q, k, v, 0)  # noqa: E731
                try:
                    res[tag] = _grads(fn, loc, torch.float32)
                except AssertionError as e:
                    res[tag] = f"AssertionError: {e}"
            out[(p, name)] = res
    out[(2, "s2")] = _s2(groups[2])
    out[(2, "uneven")] = _uneven(groups[2])
    return out


def _uneven(group) -> dict:
    """3 heads on 2 ranks: DeepSpeed splits them 2 + 1 (uneven_heads_all2all); ours needs H % P == 0."""
    from deepspeed.sequence.layer import DistributedAttention
    from deepspeed.utils import groups as ds_groups

    from seqpar import cp
    from seqpar.kernels.s2.reference import attention_reference

    class _SequenceParallel:  # the uneven split asks DeepSpeed's mpu for this rank's index in the group
        @staticmethod
        def get_sequence_parallel_rank() -> int:
            return cp.Comm(group).rank

    b, n, h, d = 2, 2 * 2 * 5, 3, 16
    t = _inputs(9, b, n, h, h, d)
    res: dict = {}
    for tag, dtype in (("ref64", torch.float64), ("ref32", torch.float32)):
        full = _grads(lambda q, k, v: attention_reference(q, k, v, causal=True)[0], t, dtype)
        res[tag] = {key: cp.shard(x, group, dim=1, balance="contiguous") for key, x in full.items()}
    loc = {key: cp.shard(x, group, dim=1, balance="contiguous") for key, x in t.items()}
    saved, ds_groups.mpu = ds_groups.mpu, _SequenceParallel()
    try:
        attn = DistributedAttention(_sdpa, group, scatter_idx=2, gather_idx=1)
        res["ds-sdpa"] = _grads(lambda q, k, v: attn(q, k, v, 0), loc, torch.float32)
    finally:
        ds_groups.mpu = saved
    try:
        cp.attention(loc["q"], loc["k"], loc["v"], kind="softmax", scheme="ulysses", group=group,
                     balance="contiguous", backend="torch")
        res["ours"] = "no error"
    except ValueError as e:
        res["ours"] = str(e)
    return res


def _s2(group) -> dict:
    from deepspeed.sequence.layer import DistributedAttention

    from seqpar import cp
    from seqpar.kernels import s2_attention
    from seqpar.kernels.s2.reference import attention_reference

    layout, (b, n, h, hkv, d) = _s2_layout(), S2_CASE
    t = _inputs(7, b, n, h, hkv, d)
    r, p = cp.Comm(group).rank, 2
    res: dict = {}
    for tag, dtype in (("ref64", torch.float64), ("ref32", torch.float32)):
        full = _grads(lambda q, k, v: attention_reference(q, k, v, layout=layout)[0], t, dtype)
        res[tag] = {key: cp.shard(x, group, dim=1, balance="contiguous") for key, x in full.items()}
    loc = {key: cp.shard(x, group, dim=1, balance="contiguous") for key, x in t.items()}
    res["ours"] = _grads(lambda q, k, v: cp.attention(q, k, v, kind="s2", scheme="ulysses", group=group,
                                                      balance="contiguous", layout=layout, backend="torch"),
                         loc, torch.float32)
    naive = DistributedAttention(lambda q, k, v: s2_attention(q, k, v, layout, backend="torch"), group,
                                 scatter_idx=2, gather_idx=1)
    placed = DistributedAttention(lambda q, k, v: s2_attention(q, k, v, layout.with_heads(h), backend="torch",
                                                               kv_head_offset=r * hkv // p, total_kv_heads=hkv),
                                  group, scatter_idx=2, gather_idx=1)
    res["ds-naive"] = _grads(lambda q, k, v: naive(q, k, v, 0), loc, torch.float32)
    res["ds-placed"] = _grads(lambda q, k, v: placed(q, k, v, 0), loc, torch.float32)
    return res


@pytest.fixture(scope="module")
def results():
    return run_ranks(_job, 4, timeout=600)


def _check(name: str, ours: dict, ref32: dict, ref64: dict) -> None:
    for key in ("o", "dq", "dk", "dv"):
        assert_rel_close(f"{name} {key}", ours[key], ref32[key], ref64[key],
                         factor=OUT_FACTOR if key == "o" else GRAD_FACTOR)


@pytest.mark.parametrize("p,name", [(p, c[0]) for p, cases in CASES.items() for c in cases])
def test_ours_and_deepspeed_ulysses_agree(results, p, name):
    hkv = next(c[4] for c in CASES[p] if c[0] == name)
    for rank, res in enumerate(results):
        r = res[(p, name)]
        for bal in ("contiguous", "zigzag"):  # ours == the single-rank reference, both balances
            _check(f"rank {rank} ours {bal}", r[f"ours-{bal}"], r["ref32"][bal], r["ref64"][bal])
        if hkv < p:  # GQA with fewer kv heads than ranks: DeepSpeed refuses, ours (checked above) works
            for tag in ("ds-sdpa", "ds-ours-local"):
                assert isinstance(r[tag], str) and "must be at least the sequence parallel size" in r[tag], r[tag]
            continue
        _check(f"rank {rank} deepspeed+sdpa", r["ds-sdpa"], r["ref32"]["contiguous"], r["ref64"]["contiguous"])
        for key in ("o", "dq", "dk", "dv"):  # the same heads on the same ranks: bitwise the same numbers
            assert torch.equal(r["ds-ours-local"][key], r["ours-contiguous"][key]), (rank, key)


def test_s2_needs_the_global_head_index(results):
    for rank, res in enumerate(results):
        r = res[(2, "s2")]
        _check(f"rank {rank} ours s2", r["ours"], r["ref32"], r["ref64"])
        for key in ("o", "dq", "dk", "dv"):
            assert torch.equal(r["ds-placed"][key], r["ours"][key]), (rank, key)
        # each rank's heads run as if they were the whole model (its one kv head taken as the dense
        # one); after the output all-to-all every rank's tokens carry those wrong heads
        err = (r["ds-naive"]["o"].double() - r["ref64"]["o"]).abs().max().item()
        assert err > 1e-2, (rank, err)


def test_deepspeed_splits_uneven_heads_ours_refuses(results):
    """What DeepSpeed's Ulysses has and ours does not: head counts that P does not divide."""
    for rank, res in enumerate(results):
        r = res[(2, "uneven")]
        _check(f"rank {rank} deepspeed uneven", r["ds-sdpa"], r["ref32"], r["ref64"])
        assert "ulysses needs num_heads (3) divisible by the CP world size (2)" in r["ours"], r["ours"]
