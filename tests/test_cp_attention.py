"""cp.attention on spawned gloo ranks == the single-rank op on the full input (outputs and grads of
q, k, v, gates, initial state), and the ledger == cp.scheme_cost exactly, forward and backward.

The helpers here (``_case``, ``_cp_job``, ``_check_case``) also run tests/test_cp_varlen.py: cases may
pack documents (``doc_lens``, any lengths) and have any length (padding slots must output 0 and get
0 gradients)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.kernels import S2Layout, flash_attention, lightning_attention, moh_attention, s2_attention
from seqpar.kernels.lightning.reference import lightning_reference
from seqpar.kernels.moh import count_computed_pairs
from seqpar.kernels.moh.reference import moh_attention_ref
from seqpar.kernels.s2.reference import attention_reference
from tolerance import GRAD_FACTOR, assert_rel_close

LAYOUT = S2Layout(block_size=16, local_blocks=2, vert_stride=2)
# two dense kv heads and a stride: the contiguous Ulysses split puts both dense heads on the last rank
PLACED = S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=2)
# balance="stride" at P = 2 and 4 (P | vert_stride: each sparse kv head's columns on one rank), a dense head
STRIDE = S2Layout(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)


def _case(name: str, kind: str, scheme: str, balance: str, world: int, *, b: int, n: int, h: int, hkv: int,
          d: int, dv: int | None = None, dtype=torch.float32, backend: str = "torch", seed: int = 0,
          **extra: Any) -> dict:
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    scale = 0.5 if kind == "lightning" else 1.0  # keep linear-attention sums O(1)
    t = {
        "q": torch.randn(b, n, h, d, generator=g) * scale,
        "k": torch.randn(b, n, hkv, d, generator=g) * scale,
        "v": torch.randn(b, n, hkv, dv, generator=g),
        "go": torch.randn(b, n, h, dv, generator=g),
    }
    kw: dict[str, Any] = {"backend": backend}
    nstate = b
    if "doc_lens" in extra:  # varlen: global cu_seqlens, per-document shards
        assert b == 1 and sum(extra["doc_lens"]) == n
        kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(extra["doc_lens"]).cumsum(0).tolist()], dtype=torch.int32)
        nstate = len(extra["doc_lens"])
    else:
        kw["seq_len"] = n  # the padding slots (n not a multiple of P) are known
    if kind == "lightning":
        kw["slope"] = torch.linspace(0.02, 0.7, h)
        if extra.get("with_state"):
            t["initial_state"] = torch.randn(nstate, h, d, dv, generator=g) * 0.3
            t["gf"] = torch.randn(nstate, h, d, dv, generator=g)
            kw["output_final_state"] = True
    if kind == "moh":
        t["gates"] = torch.rand(b, n, h, generator=g) * (torch.rand(b, n, h, generator=g) > 0.4)
    if kind == "s2":
        kw["layout"] = extra.get("layout", LAYOUT)
        if "kv_head_offset" in extra:  # a tensor-parallel slice of the model's kv heads
            kw["kv_head_offset"], kw["total_kv_heads"] = extra["kv_head_offset"], extra["total_kv_heads"]
    if "causal" in extra:
        kw["causal"] = extra["causal"]
    if "window" in extra:  # softmax's sliding window
        kw["window"] = extra["window"]
    if "ulysses_degree" in extra:
        kw["ulysses_degree"] = extra["ulysses_degree"]
    # balance="cost": the partition is built from the model's cost model and passed as partition=;
    # balance="stride": kind s2 takes the block from its layout, other kinds get partition=
    block = (kw["layout"].block_size if kind == "s2" else extra["block_size"]) if balance == "stride" else None
    return {"name": name, "kind": kind, "scheme": scheme, "balance": balance, "dtype": dtype,
            "tensors": t, "kw": kw, "cost": extra.get("cost"), "block_size": block}


def _as_partition(c: dict) -> bool:
    """The case passes its partition object (cost model, or a stride partition of a kind without blocks)."""
    return c.get("cost") is not None or (c.get("block_size") is not None and c["kind"] != "s2")


def _cases(world: int) -> list[dict]:
    p = world
    return [
        _case("softmax-ag-zz-gqa-odd", "softmax", "allgather", "zigzag", p, b=2, n=2 * p * 3, h=3, hkv=1, d=16, seed=1),
        _case("softmax-ag-contig", "softmax", "allgather", "contiguous", p, b=1, n=p * 5, h=4, hkv=2, d=32, seed=2),
        _case("softmax-ag-zz-triton", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 3, h=2, hkv=1, d=16,
              backend="triton", seed=3),
        _case("softmax-ag-bf16", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 5, h=2, hkv=2, d=16,
              dtype=torch.bfloat16, seed=4),
        _case("softmax-uly-zz-gqa", "softmax", "ulysses", "zigzag", p, b=2, n=2 * p * 3, h=8, hkv=2, d=16, seed=5),
        _case("softmax-uly-contig", "softmax", "ulysses", "contiguous", p, b=1, n=p * 7, h=4, hkv=4, d=16, seed=6),
        _case("softmax-ag-noncausal", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 3, h=2, hkv=1, d=16,
              causal=False, seed=33),
        _case("softmax-ring-noncausal", "softmax", "ring", "zigzag", p, b=1, n=2 * p * 3, h=2, hkv=2, d=16,
              causal=False, seed=34),
        _case("softmax-uly-noncausal", "softmax", "ulysses", "contiguous", p, b=1, n=p * 3, h=4, hkv=4, d=16,
              causal=False, seed=35),
        _case("s2-ag-zz", "s2", "allgather", "zigzag", p, b=1, n=2 * p * 16, h=4, hkv=2, d=16, seed=7),
        _case("s2-ag-contig", "s2", "allgather", "contiguous", p, b=1, n=p * 32, h=2, hkv=2, d=32, seed=8),
        _case("s2-exchange-zz", "s2", "allgather", "zigzag", p, b=1, n=2 * p * 64, h=4, hkv=2, d=16, seed=23,
              layout=S2Layout(block_size=16, local_blocks=2, vert_stride=4)),
        _case("s2-exchange-dense-head", "s2", "allgather", "zigzag", p, b=1, n=2 * p * 32, h=3, hkv=3, d=16,
              seed=24, layout=S2Layout(block_size=16, local_blocks=3, vert_stride=2, num_dense_heads=1,
                                       head_sliding_offset=1)),
        _case("moh-ag-zz", "moh", "allgather", "zigzag", p, b=2, n=2 * p * 3, h=4, hkv=2, d=16, seed=9),
        _case("moh-uly-zz", "moh", "ulysses", "zigzag", p, b=1, n=2 * p * 3, h=4, hkv=1, d=16, seed=10),
        _case("softmax-ring-zz-gqa", "softmax", "ring", "zigzag", p, b=2, n=2 * p * 3, h=3, hkv=1, d=16, seed=14),
        _case("softmax-ring-contig", "softmax", "ring", "contiguous", p, b=1, n=p * 5, h=2, hkv=2, d=32, seed=15),
        _case("softmax-ring-bf16", "softmax", "ring", "zigzag", p, b=1, n=2 * p * 5, h=2, hkv=1, d=16,
              dtype=torch.bfloat16, seed=16),
        _case("s2-ring-zz", "s2", "ring", "zigzag", p, b=1, n=2 * p * 16, h=4, hkv=2, d=16, seed=17),
        _case("moh-ring-zz", "moh", "ring", "zigzag", p, b=1, n=2 * p * 3, h=4, hkv=2, d=16, seed=18),
        # the ring backward calls the Triton kernels' backward with the merged (fp32 out, lse)
        _case("moh-ring-zz-triton", "moh", "ring", "zigzag", p, b=1, n=2 * p * 8, h=2, hkv=1, d=16,
              backend="triton", seed=44),
        _case("s2-ring-zz-triton", "s2", "ring", "zigzag", p, b=1, n=2 * p * 16, h=2, hkv=1, d=16,
              backend="triton", seed=45),
        # a TP slice: these ranks hold kv heads 2..3 of the model's 6 (explicit step 3, the last global
        # kv head dense): the rotation and the dense head follow the global index under every scheme
        *[_case(f"s2-tp-slice-{sch}", "s2", sch, "zigzag", p, b=1, n=2 * p * 32, h=4, hkv=2, d=16, seed=46 + i,
                layout=S2Layout(block_size=16, local_blocks=1, vert_stride=8, num_dense_heads=1, head_sliding_step=3),
                kv_head_offset=2, total_kv_heads=6, **({"ulysses_degree": 2} if sch == "usp" else {}))
          for i, sch in enumerate(("allgather", "ring", "ulysses", "usp"))],
        _case("softmax-usp-zz-gqa", "softmax", "usp", "zigzag", p, b=1, n=2 * p * 3, h=4, hkv=1, d=16, seed=27,
              ulysses_degree=2),
        _case("softmax-usp-contig", "softmax", "usp", "contiguous", p, b=2, n=p * 5, h=2, hkv=2, d=16, seed=28,
              ulysses_degree=2),
        _case("moh-usp-zz", "moh", "usp", "zigzag", p, b=1, n=2 * p * 3, h=4, hkv=2, d=16, seed=29,
              ulysses_degree=2),
        _case("s2-uly-zz-gqa-dense", "s2", "ulysses", "zigzag", p, b=1, n=2 * p * 10, h=4, hkv=2, d=16, seed=36,
              layout=S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1)),
        _case("s2-uly-contig-mha", "s2", "ulysses", "contiguous", p, b=2, n=p * 24, h=4, hkv=4, d=32, seed=37,
              layout=S2Layout(block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=1,
                              head_sliding_offset=1)),
        _case("s2-usp-zz", "s2", "usp", "zigzag", p, b=1, n=2 * p * 16, h=4, hkv=2, d=16, seed=38, ulysses_degree=2,
              layout=S2Layout(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)),
        _case("s2-uly-zz-triton", "s2", "ulysses", "zigzag", p, b=1, n=2 * p * 16, h=4, hkv=2, d=16, seed=41,
              backend="triton", layout=S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1)),
        _case("s2-usp-contig-mqa", "s2", "usp", "contiguous", p, b=1, n=p * 32, h=2, hkv=1, d=16, seed=42,
              ulysses_degree=2, layout=S2Layout(block_size=16, local_blocks=1, vert_stride=2, head_sliding_offset=1)),
        # S2 head placement (default "balanced"): each rank gets kv heads whose blocks sum to about the
        # same (the two dense heads on different ranks), heads permuted around the all-to-alls (GQA: the
        # usp cases here and in tests/test_cp_varlen.py)
        _case("s2-uly-placed-mha", "s2", "ulysses", "zigzag", p, b=1, n=2 * p * 8 + 5, h=8, hkv=8, d=16, seed=60,
              layout=PLACED),
        _case("s2-usp-placed-gqa", "s2", "usp", "contiguous", p, b=1, n=2 * p * 8 + 5, h=8, hkv=4, d=16, seed=62,
              ulysses_degree=2, layout=PLACED),
        _case("lightning-usp-zz", "lightning", "usp", "zigzag", p, b=2, n=2 * p * 5, h=4, hkv=2, d=16, dv=32,
              with_state=True, seed=39, ulysses_degree=2),
        _case("lightning-usp-contig", "lightning", "usp", "contiguous", p, b=1, n=p * 6, h=2, hkv=1, d=16, seed=40,
              ulysses_degree=2),
        _case("lightning-usp-u1-triton", "lightning", "usp", "zigzag", p, b=1, n=2 * p * 16, h=2, hkv=1, d=16,
              backend="triton", with_state=True, seed=43, ulysses_degree=1),
        _case("lightning-lasp2-zz", "lightning", "allgather", "zigzag", p, b=2, n=2 * p * 5, h=3, hkv=1, d=16,
              dv=32, with_state=True, seed=11),
        _case("lightning-lasp2-bf16-triton", "lightning", "allgather", "zigzag", p, b=1, n=2 * p * 16, h=2, hkv=1,
              d=16, dtype=torch.bfloat16, backend="triton", with_state=True, seed=25),
        _case("softmax-ring-triton", "softmax", "ring", "zigzag", p, b=1, n=2 * p * 4, h=2, hkv=1, d=16,
              backend="triton", seed=26),
        _case("lightning-lasp2-contig", "lightning", "allgather", "contiguous", p, b=1, n=p * 6, h=2, hkv=2, d=16,
              seed=12),
        _case("softmax-ag-varlen", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 6, h=3, hkv=1, d=16,
              doc_lens=[2 * p * 2, 2 * p, 2 * p * 3], seed=19),
        _case("softmax-uly-varlen", "softmax", "ulysses", "zigzag", p, b=1, n=2 * p * 5, h=4, hkv=2, d=16,
              doc_lens=[2 * p * 3, 2 * p * 2], seed=20),
        _case("lightning-lasp2-varlen", "lightning", "allgather", "zigzag", p, b=1, n=2 * p * 6, h=2, hkv=1, d=16,
              doc_lens=[2 * p, 2 * p * 4, 2 * p], with_state=True, seed=21),
        _case("lightning-uly-varlen", "lightning", "ulysses", "zigzag", p, b=1, n=2 * p * 4, h=4, hkv=4, d=16,
              doc_lens=[2 * p * 3, 2 * p], with_state=True, seed=22),
        _case("lightning-lasp2-contig-2x", "lightning", "allgather", "contiguous", p, b=1, n=p * 12, h=2, hkv=2,
              d=16, seed=30),
        _case("lightning-lasp1-zz-gqa", "lightning", "ring", "zigzag", p, b=2, n=2 * p * 5, h=3, hkv=1, d=16, dv=32,
              with_state=True, seed=31),
        _case("lightning-lasp1-contig", "lightning", "ring", "contiguous", p, b=1, n=p * 6, h=2, hkv=2, d=16, seed=32),
        _case("lightning-uly-zz", "lightning", "ulysses", "zigzag", p, b=1, n=2 * p * 3, h=4, hkv=2, d=16,
              with_state=True, seed=13),
        # sliding-window softmax: windows below a chunk (zigzag chunks of 6, contiguous of 7-8) and
        # above it, odd lengths, GQA; the ring moves only the halo (ledger == scheme_cost(window=))
        _case("softmax-ring-win-below", "softmax", "ring", "zigzag", p, b=1, n=2 * p * 6, h=3, hkv=1, d=16,
              window=4, seed=60),
        _case("softmax-ring-win-above", "softmax", "ring", "contiguous", p, b=1, n=7 * p + 3, h=2, hkv=2, d=16,
              window=11, seed=61),
        _case("softmax-ag-win", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 4 + 1, h=4, hkv=2, d=16,
              window=6, seed=63),
        # allgather moves only the halo: a window below a chunk (contiguous, batch 2, GQA, odd length)
        # and one covering the sequence (rank 0 reads every row of the others, no padding: the plain
        # all-gather, see HALO below)
        _case("softmax-ag-win-below", "softmax", "allgather", "contiguous", p, b=2, n=7 * p + 3, h=4, hkv=2, d=16,
              window=3, seed=66),
        _case("softmax-ag-win-covers", "softmax", "allgather", "zigzag", p, b=1, n=2 * p * 3, h=2, hkv=1, d=16,
              window=2 * p * 3 + 1, seed=67),
        _case("softmax-uly-win", "softmax", "ulysses", "zigzag", p, b=1, n=2 * p * 5, h=4, hkv=2, d=16,
              window=7, seed=64),
        _case("softmax-usp-win", "softmax", "usp", "zigzag", p, b=1, n=2 * p * 5 + 3, h=4, hkv=1, d=16,
              window=5, seed=65, ulysses_degree=2),
        # balance="stride": S2 blocks round robin (block b on rank b mod P), odd lengths (a partial last
        # block, a rank holding a block more), GQA, a dense head; other kinds on the same kind of
        # partition (partition=, block_size given)
        _case("s2-ag-stride-dense", "s2", "allgather", "stride", p, b=2, n=3 * p * 16 + 5, h=6, hkv=3, d=16,
              seed=70, layout=STRIDE),
        _case("s2-ring-stride-gqa", "s2", "ring", "stride", p, b=1, n=2 * p * 16 + 7, h=4, hkv=2, d=16, seed=71,
              layout=STRIDE),
        _case("s2-uly-stride", "s2", "ulysses", "stride", p, b=1, n=2 * p * 16 + 3, h=4, hkv=4, d=16, seed=72,
              layout=STRIDE),
        _case("s2-usp-stride-gqa", "s2", "usp", "stride", p, b=1, n=2 * p * 16 + 9, h=4, hkv=2, d=16, seed=73,
              layout=STRIDE, ulysses_degree=2),
        _case("softmax-ring-stride", "softmax", "ring", "stride", p, b=1, n=5 * p * 4 + 1, h=3, hkv=1, d=16,
              seed=74, block_size=4),
        _case("lightning-lasp2-stride", "lightning", "allgather", "stride", p, b=2, n=5 * p * 4 + 2, h=2, hkv=2,
              d=16, with_state=True, seed=75, block_size=4),
        _case("moh-ag-stride", "moh", "allgather", "stride", p, b=1, n=5 * p * 4 + 3, h=4, hkv=2, d=16, seed=76,
              block_size=4),
    ]


SHARDED = ("q", "k", "v", "go", "gates")
GRADS = ("q", "k", "v", "gates", "initial_state")


def _partition(c: dict, world: int) -> cp.Partition:
    return cp.make_partition(c["tensors"]["q"].shape[1], (0, world), balance=c["balance"],
                             cu_seqlens=c["kw"].get("cu_seqlens"), cost=c.get("cost"), block_size=c.get("block_size"))


def _cp_job(rank: int, world: int, cases: list[dict]) -> dict:
    out = {}
    for c in cases:
        t, bal = c["tensors"], c["balance"]
        part = _partition(c, world)
        loc = {name: part.shard(x.to(c["dtype"]) if name in ("q", "k", "v") else x, rank)
               for name, x in t.items() if name in SHARDED}
        leaves = {n: loc[n].requires_grad_() for n in ("q", "k", "v")}
        kw = dict(c["kw"])
        if _as_partition(c):  # a cost-balanced (or non-S2 stride) partition travels as the object itself
            kw = {n: x for n, x in kw.items() if n not in ("cu_seqlens", "seq_len")}
            kw["partition"], bal = part, None
        if "gates" in loc:
            leaves["gates"] = kw["gates"] = loc["gates"].requires_grad_()
        if "initial_state" in t:
            leaves["initial_state"] = kw["initial_state"] = t["initial_state"].clone().requires_grad_()
        with cp.comm_ledger() as fwd, count_computed_pairs() as pairs_fwd:
            res = cp.attention(leaves["q"], leaves["k"], leaves["v"], kind=c["kind"], scheme=c["scheme"],
                               group=None, balance=bal, **kw)
        o, final = res if c["kind"] == "lightning" else (res, None)
        loss = (o.double() * loc["go"].double()).sum()
        if final is not None:  # replicated output: count it once over the group
            loss = loss + (final.double() * t["gf"].double()).sum() / world
        with cp.comm_ledger() as bwd:
            loss.backward()
        out[c["name"]] = {"o": o, "final": final, "fwd": fwd.summary(), "bwd": bwd.summary(),
                          "grads": {n: x.grad for n, x in leaves.items()},
                          "pairs": pairs_fwd.forward}
    return out


def _single(c: dict, dtype: torch.dtype, truth: bool):
    """The op on the full input: fp64 reference (truth) or the single-rank kernel in ``dtype``."""
    t, kw = c["tensors"], c["kw"]
    leaves = {n: t[n].to(dtype).clone().requires_grad_() for n in ("q", "k", "v")}
    if "gates" in t:
        leaves["gates"] = t["gates"].to(dtype if truth else torch.float32).clone().requires_grad_()
    if "initial_state" in t:
        leaves["initial_state"] = t["initial_state"].to(torch.float64 if truth else torch.float32).clone().requires_grad_()
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    cu = kw.get("cu_seqlens")
    final = None
    if c["kind"] == "softmax":
        causal, win = kw.get("causal", True), kw.get("window")
        o = (attention_reference(q, k, v, causal=causal, cu_seqlens=cu, window=win)[0] if truth
             else flash_attention(q, k, v, causal=causal, cu_seqlens=cu, window=win, backend=kw["backend"]))
    elif c["kind"] == "s2":
        tp = {n: kw[n] for n in ("kv_head_offset", "total_kv_heads") if n in kw}
        o = (attention_reference(q, k, v, layout=kw["layout"], cu_seqlens=cu, **tp)[0] if truth
             else s2_attention(q, k, v, kw["layout"], cu_seqlens=cu, backend=kw["backend"], **tp))
    elif c["kind"] == "moh":
        causal = kw.get("causal", True)
        o = (moh_attention_ref(q, k, v, leaves["gates"], causal=causal, cu_seqlens=cu)[0] if truth
             else moh_attention(q, k, v, leaves["gates"], causal=causal, cu_seqlens=cu, backend=kw["backend"]))
    else:
        init = leaves.get("initial_state")
        if truth:
            o, final = lightning_reference(q, k, v, kw["slope"].double(), initial_state=init, cu_seqlens=cu)
        else:
            o, final = lightning_attention(q, k, v, kw["slope"], initial_state=init, cu_seqlens=cu,
                                           output_final_state=True, backend=kw["backend"])
        if "gf" not in t:
            final = None
    loss = (o.double() * t["go"].double()).sum()
    if final is not None:
        loss = loss + (final.double() * t["gf"].double()).sum()
    loss.backward()
    return o, final, {n: x.grad for n, x in leaves.items()}


def _assemble(name: str, parts: list[torch.Tensor], part: cp.Partition) -> torch.Tensor:
    """The global tensor from every rank's buffer; padding slots must hold exactly 0."""
    full = torch.empty((parts[0].shape[0], part.seq_len, *parts[0].shape[2:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        idx = part.token_index(r)
        full[:, idx[idx >= 0]] = p[:, idx >= 0]
        assert not p[:, ~part.valid(r)].any(), f"{name}: rank {r} has nonzero values in its padding slots"
    return full


def _check_case(c: dict, per_rank: list[dict], world: int) -> None:
    name, bal, cu = c["name"], c["balance"], c["kw"].get("cu_seqlens")
    part = _partition(c, world)
    o64, f64, g64 = _single(c, torch.float64, truth=True)
    olp, flp, glp = _single(c, c["dtype"], truth=False)
    o = _assemble(f"{name} out", [r["o"] for r in per_rank], part)
    assert_rel_close(f"{name} out", o, olp, o64)
    if f64 is not None:
        for r in per_rank:  # every rank holds the same final state
            assert_rel_close(f"{name} final_state", r["final"], flp, f64)
    for gname in g64:
        if gname == "initial_state":
            ours = sum(r["grads"][gname] for r in per_rank)  # replicated input: shares sum up
        else:
            ours = _assemble(f"{name} d{gname}", [r["grads"][gname] for r in per_rank], part)
        assert_rel_close(f"{name} d{gname}", ours, glp[gname], g64[gname], factor=GRAD_FACTOR)
    if c["kind"] == "moh":  # compute skipping survives CP: only active (token, head) rows are computed
        from seqpar.cp.ring import plan

        active = c["tensors"]["gates"] > 0
        fwd_pairs = sum(r["pairs"] for r in per_rank)  # the torch fallback counts forward rows
        if c["scheme"] in ("allgather", "ulysses"):
            assert fwd_pairs == int(active.sum()), f"{name}: forward pairs {fwd_pairs} != active {int(active.sum())}"
        elif c["scheme"] == "ring":  # each query piece's active rows, once per key piece it meets
            gl = [part.shard(c["tensors"]["gates"], r) > 0 for r in range(world)]
            expect = sum(int(gl[r][:, pr.q_local:pr.q_local + pr.q_len].sum())
                         for r in range(world) for st in plan(part, r, c["kw"].get("causal", True)) for pr in st.pairs)
            assert fwd_pairs == expect, f"{name}: forward pairs {fwd_pairs} != {expect}"
    # ledger == closed form, forward and backward
    t = c["tensors"]
    b, n, h, d = t["q"].shape
    cost_kw = dict(kv_head_offset=c["kw"].get("kv_head_offset", 0), total_kv_heads=c["kw"].get("total_kv_heads"),
                   world=world, seq_len=n, batch=b, heads=h, kv_heads=t["k"].shape[2], head_dim=d,
                   v_head_dim=t["v"].shape[-1], dtype=c["dtype"], balance=bal, gates_dtype=torch.float32,
                   output_final_state=bool(c["kw"].get("output_final_state")),
                   **({"partition": part} if _as_partition(c) else {"cu_seqlens": cu}),
                   layout=c["kw"].get("layout"), ulysses_degree=c["kw"].get("ulysses_degree"),
                   causal=c["kw"].get("causal", True), window=c["kw"].get("window"))
    for rank, r in enumerate(per_rank):
        cost = cp.scheme_cost(c["kind"], c["scheme"], rank=rank, **cost_kw)
        assert r["fwd"] == cost["fwd"], f"{name}: forward ledger {r['fwd']} != scheme_cost {cost['fwd']}"
        assert r["bwd"] == cost["bwd"], f"{name}: backward ledger {r['bwd']} != scheme_cost {cost['bwd']}"


def run_and_check(cases: list[dict], world: int, timeout: float, job=None) -> list[dict]:
    """Run ``cases`` on ``world`` gloo ranks (one spawn; ``job`` defaults to :func:`_cp_job`) and check
    every one; returns the per-rank results."""
    results = run_ranks(job or _cp_job, world, cases, timeout=timeout)
    failures = []
    for c in cases:
        try:
            _check_case(c, [r[c["name"]] for r in results], world)
        except AssertionError as e:  # report every failing case, not only the first
            failures.append(str(e))
    assert not failures, "\n".join(failures)
    return results


# allgather + window: the collectives (forward, backward) each case must issue
HALO = {"softmax-ag-win": ("all_to_all", "all_to_all"), "softmax-ag-win-below": ("all_to_all", "all_to_all"),
        "softmax-ag-win-covers": ("all_gather", "reduce_scatter")}


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_single_rank(world):
    results = run_and_check(_cases(world), world, timeout=300)
    # allgather + window: only the halo moves (one all-to-all), unless the window covers every row
    for r in results:
        for name, (fwd, bwd) in HALO.items():
            assert list(r[name]["fwd"]) == [fwd] and list(r[name]["bwd"]) == [bwd], (name, r[name])
    # LASP-2 moves the same bytes when the sequence doubles
    for r in results:
        assert r["lightning-lasp2-contig"]["fwd"] == r["lightning-lasp2-contig-2x"]["fwd"]
        assert r["lightning-lasp2-contig"]["bwd"] == r["lightning-lasp2-contig-2x"]["bwd"]


def _ring_backward_job(rank: int, world: int) -> dict:
    from seqpar.cp import comm as comm_mod
    from seqpar.cp.local import LocalOp

    log: list[str] = []
    in_backward = [False]
    orig_call, orig_bwd = LocalOp.__call__, LocalOp.backward
    orig_pass, orig_wait, orig_grad = comm_mod.Comm.exchange, comm_mod.Pending.wait, torch.autograd.grad

    def call(self, *a, **kw):
        if in_backward[0]:
            log.append("forward")
        return orig_call(self, *a, **kw)

    def backward(self, *a, **kw):
        log.append("block_backward")
        return orig_bwd(self, *a, **kw)

    def ring_pass(self, send, *a, **kw):
        pending = orig_pass(self, send, *a, **kw)
        pending._label = "dkv" if kw["dtype"] == torch.float32 else "kv"
        if in_backward[0]:
            log.append(f"post_{pending._label}")
        return pending

    def wait(self):
        if in_backward[0] and getattr(self, "_label", None):
            log.append(f"wait_{self._label}")
        return orig_wait(self)

    def grad(*a, **kw):
        log.append("autograd.grad")
        return orig_grad(*a, **kw)

    LocalOp.__call__, LocalOp.backward = call, backward
    comm_mod.Comm.exchange, comm_mod.Pending.wait, torch.autograd.grad = ring_pass, wait, grad
    try:
        out = {}
        for kind in ("softmax", "s2", "moh"):
            g = torch.Generator().manual_seed(1)
            n, h = 2 * world * 16, 2
            q, k, v = (cp.shard(torch.randn(1, n, h, 16, generator=g), None).to(torch.bfloat16).requires_grad_()
                       for _ in range(3))
            kw: dict[str, Any] = {"backend": "torch"}
            if kind == "s2":
                kw["layout"] = LAYOUT
            if kind == "moh":
                kw["gates"] = cp.shard(torch.rand(1, n, h, generator=g), None)
            o = cp.attention(q, k, v, kind=kind, scheme="ring", **kw)
            log.clear()
            in_backward[0] = True
            o.float().sum().backward()
            in_backward[0] = False
            out[kind] = list(log)
        return out
    finally:
        LocalOp.__call__, LocalOp.backward = orig_call, orig_bwd
        comm_mod.Comm.exchange, comm_mod.Pending.wait, torch.autograd.grad = orig_pass, orig_wait, orig_grad


@pytest.mark.parametrize("world", [2, 4])
def test_ring_backward_uses_merged_lse_and_overlaps_the_dkv_hop(world):
    for per_kind in run_ranks(_ring_backward_job, world, timeout=120):
        for kind, log in per_kind.items():
            # the kernel's backward runs per block with the merged (out, lse): no forward, no autograd
            assert "forward" not in log and "autograd.grad" not in log, (kind, log)
            assert log.count("block_backward") >= world
            # one dK/dV return per step after the local one (every hop has something under zigzag)
            assert log.count("post_dkv") == world - 1 and log.count("wait_dkv") == world - 1
            # each return is posted right after its block and waited for only after the next block
            posts = [i for i, e in enumerate(log) if e == "post_dkv"]
            waits = [i for i, e in enumerate(log) if e == "wait_dkv"]
            for s in range(world - 2):
                assert "block_backward" in log[posts[s] + 1:waits[s]], (kind, s, log)
