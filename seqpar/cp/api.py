"""``cp.attention``: one entry for every attention kind under every CP scheme, and the closed-form
communication cost of each pair (``cp.scheme_cost``) that the ledger matches exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from seqpar.cp.allgather import allgather_attention
from seqpar.cp.comm import Comm
from seqpar.cp.lasp1 import hops_received, lasp1_attention
from seqpar.cp.lasp2 import lasp2_attention
from seqpar.cp.local import softmax_family_op
from seqpar.cp.partition import BALANCES, check_varlen, chunk_ids, resolve_group
from seqpar.cp.ring import ring_attention
from seqpar.cp.s2_exchange import exchange_applies, exchange_blocks, s2_exchange_attention
from seqpar.cp.ulysses import kv_head_offset as uly_kv_offset, ulysses_attention
from seqpar.cp.usp import usp_attention, usp_lightning_attention
from seqpar.cp.validation import mark_agreed, needs_agreement, signature

KINDS = ("softmax", "s2", "lightning", "moh")
SCHEMES = ("allgather", "ring", "ulysses", "usp")
# Pairs implemented and tested; everything else raises before any communication.
SUPPORTED = {
    ("softmax", "allgather"), ("softmax", "ulysses"), ("softmax", "ring"),
    ("s2", "allgather"), ("s2", "ring"), ("s2", "ulysses"), ("s2", "usp"),
    ("lightning", "allgather"), ("lightning", "ulysses"), ("lightning", "ring"), ("lightning", "usp"),
    ("moh", "allgather"), ("moh", "ulysses"), ("moh", "ring"),
    ("softmax", "usp"), ("moh", "usp"),
}
_KWARGS = {
    "softmax": {"sm_scale", "causal", "backend", "cu_seqlens", "ulysses_degree"},
    "s2": {"layout", "sm_scale", "backend", "ulysses_degree", "kv_head_offset", "total_kv_heads"},
    "lightning": {"slope", "initial_state", "output_final_state", "backend", "cu_seqlens", "cu_seqlens_unpadded",
                  "ulysses_degree"},
    "moh": {"gates", "sm_scale", "causal", "backend", "ulysses_degree"},
}


def _pairs() -> str:
    return ", ".join(f"{k}x{s}" for k, s in sorted(SUPPORTED))


def _validate(q, k, v, kind: str, scheme: str, balance: str, world: int, kw: dict[str, Any]) -> None:
    from seqpar.kernels import S2Layout
    from seqpar.kernels._common import check_cu_seqlens, check_data, check_qkv

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if (kind, scheme) not in SUPPORTED:
        raise ValueError(f"kind={kind!r} with scheme={scheme!r} is not supported; supported pairs: {_pairs()}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    extra = set(kw) - _KWARGS[kind]
    if extra:
        raise ValueError(f"unexpected keyword(s) {sorted(extra)} for kind={kind!r}; accepted: {sorted(_KWARGS[kind])}")
    b, s, _, h, hkv, d = check_qkv(q, k, v, same_dv=kind != "lightning")
    per_rank = len(chunk_ids(0, world, balance))
    if s % per_rank:
        raise ValueError(f"local sequence length {s} must be divisible by {per_rank} (chunks per rank for "
                         f"balance={balance!r}); the global length must be divisible by {per_rank * world}")
    c = s // per_rank
    if kind == "s2":
        layout = kw.get("layout")
        if layout is None:
            raise ValueError("kind='s2' needs layout=S2Layout(...)")
        if not isinstance(layout, S2Layout):
            raise ValueError(f"layout must be an S2Layout, got {type(layout).__name__}")
        # local kv heads are global kv heads kv_head_offset.. of total_kv_heads (tensor parallelism);
        # the rotation step comes from the model's query heads (S2Layout, docs/s2.md)
        total_kv = layout.validate_head_slice(hkv, kw.get("kv_head_offset", 0), kw.get("total_kv_heads"))
        kw["layout"] = layout.with_heads(total_kv * (h // hkv))
        if scheme != "ulysses" and c % layout.block_size:  # ulysses runs on the whole sequence
            raise ValueError(f"s2 under CP needs each chunk ({c} tokens) to be a multiple of layout.block_size="
                             f"{layout.block_size} so blocks stay absolute; make the global length a multiple "
                             f"of {per_rank * world * layout.block_size}")
    if (kind, scheme) == ("lightning", "ring") and kw.get("cu_seqlens") is not None:
        raise ValueError("lightning with scheme='ring' (LASP-1) supports no cu_seqlens (varlen); "
                         "use scheme='allgather' (LASP-2) or 'ulysses'")
    if kind == "lightning":
        from seqpar.kernels.lightning.api import _check_slope

        slope = kw.get("slope")
        if not isinstance(slope, torch.Tensor) or tuple(slope.shape) != (h,):
            raise ValueError(f"kind='lightning' needs slope as a tensor of shape [heads] = [{h}]")
        _check_slope(slope, h, q.device)  # values too: a bad slope on one rank must fail every rank
    if kind == "moh":
        gates = kw.get("gates")
        if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (b, s, h):
            raise ValueError(f"kind='moh' needs gates [batch, local seq, heads] = {[b, s, h]}, "
                             f"got {None if gates is None else tuple(gates.shape)}")
        # same rule as moh_attention, before any exchange (deferred to the step's end in step_checks)
        check_data(~(gates.detach() >= 0), "gates must be >= 0 and not NaN (a gate of 0 skips the pair); "
                                           "e.g. use softmax/top-k weights or gates.clamp_min(0)")
    cu = kw.get("cu_seqlens")
    if cu is not None:
        if scheme not in ("allgather", "ulysses"):
            raise ValueError(f"varlen (cu_seqlens) under CP is supported with scheme 'allgather' or 'ulysses', "
                             f"got {scheme!r}")
        if balance != "zigzag":
            raise ValueError("varlen under CP uses per-document zigzag (Megatron THD, cp.shard_varlen); "
                             "pass balance='zigzag'")
        if not isinstance(cu, torch.Tensor):
            raise ValueError("cu_seqlens must be the global int32 tensor [num_docs + 1]")
        check_cu_seqlens(cu, b, s * world, name="cu_seqlens (global, over all ranks)")
        check_varlen(cu, world)  # raises if a document is not a multiple of 2 * world
    if kw.get("cu_seqlens_unpadded") is not None:
        from seqpar.kernels.lightning.api import padded_segments

        if cu is None:
            raise ValueError("cu_seqlens_unpadded (real document boundaries) needs cu_seqlens (the padded ones)")
        padded_segments(cu, kw["cu_seqlens_unpadded"])  # same documents, real <= padded
    init = kw.get("initial_state")
    if kind == "lightning" and init is not None:  # replicated, but only some ranks read it: check here
        from seqpar.kernels.lightning.api import _check_state

        _check_state("initial_state", init, b if cu is None else cu.numel() - 1, h, q.shape[-1], v.shape[-1], q.device)
    if "ulysses_degree" in kw and scheme != "usp":
        raise ValueError(f"ulysses_degree is a scheme='usp' option, got scheme={scheme!r}")
    if scheme == "usp":
        ud = kw.get("ulysses_degree")
        if isinstance(ud, bool) or not isinstance(ud, int) or ud < 1 or world % ud:
            raise ValueError(f"scheme='usp' needs ulysses_degree, a positive divisor of the CP world size "
                             f"{world}, got {ud!r}")
        if h % ud:
            raise ValueError(f"usp needs num_heads ({h}) divisible by ulysses_degree ({ud})")
        if hkv % ud and ud % hkv:
            raise ValueError(f"usp needs num_kv_heads ({hkv}) divisible by ulysses_degree ({ud}) or the reverse")
    if scheme == "ulysses":
        if h % world:
            raise ValueError(f"ulysses needs num_heads ({h}) divisible by the CP world size ({world})")
        if hkv % world and world % hkv:
            raise ValueError(f"ulysses needs num_kv_heads ({hkv}) divisible by world ({world}) or world divisible "
                             f"by num_kv_heads (kv heads are then replicated)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str, scheme: str = "allgather",
              group=None, balance: str = "zigzag", **kind_kwargs: Any):
    """Context-parallel attention on this rank's shards; equals the single-device op on the full input.

    Args:
        q: ``[batch, seq/P, heads, dim]``, k, v: ``[batch, seq/P, kv_heads, dim]`` — this rank's shards
            as produced by ``cp.shard(x, group, dim=1, balance=balance)``.
        kind: "softmax" | "s2" | "lightning" | "moh".
        scheme: "allgather" (for lightning: LASP-2) | "ring" | "ulysses" | "usp" (see SUPPORTED: every
            pair; lightning "ring" is LASP-1 state passing, lightning "usp" is Ulysses x LASP-2).
        group: the CP process group (None = default group).
        balance: "zigzag" (rank r holds chunks r and 2P-1-r of 2P) or "contiguous".
        kind_kwargs: softmax: ``sm_scale, causal, backend, cu_seqlens``; s2: ``layout, sm_scale,
            backend, kv_head_offset, total_kv_heads`` (tensor parallelism: the local kv heads are
            global kv heads ``kv_head_offset ..`` of ``total_kv_heads``, so the pattern is the
            model's); lightning: ``slope, initial_state, output_final_state, backend, cu_seqlens,
            cu_seqlens_unpadded`` (the real boundaries of documents padded by ``cp.pad_varlen``:
            final states at each document's last real token, pad outputs 0);
            moh: ``gates`` (this rank's ``[batch, seq/P, heads]``), ``sm_scale, causal, backend``;
            any kind with scheme="usp": ``ulysses_degree`` (divides P; ring over P/degree groups).
            ``cu_seqlens`` is the *global* int32 ``[num_docs + 1]`` (batch 1; every document a
            multiple of 2P, see ``cp.pad_varlen``); shards come from ``cp.shard_varlen`` (THD
            per-document zigzag); schemes allgather and ulysses.

    Returns:
        The local output shard ``[batch, seq/P, heads, dv]``; for lightning ``(o, final_state | None)``
        like ``lightning_attention``. ``initial_state`` and ``final_state`` are replicated on every
        rank: the gradient each rank gets for ``initial_state`` is its share (sum over the group,
        as for any replicated input), and a loss on ``final_state`` is counted once per rank.

    Every argument is validated (ValueError naming the supported pairs or the numbers) before any
    data communication. Data-dependent checks (MoH gates >= 0, Lightning slopes) may fail on one
    rank only, so the ranks agree first (``Comm.agree``: one int32 all-reduce, not in the ledger)
    and every rank raises the failing rank's ValueError; nobody is left waiting in a collective.
    Inside ``cp.step_checks()`` (a training step) the data checks are read once at the step's end
    and a call signature is agreed only the first time: no host sync per layer.
    """
    _, world = resolve_group(group)
    try:
        _validate(q, k, v, kind, scheme, balance, world, kind_kwargs)
        error = None
    except ValueError as e:
        if isinstance(group, tuple):  # no process group to agree over (validation-only use)
            raise
        error = e
    comm = Comm(group)
    # Data-dependent checks (gates, slopes) can fail on one rank only: agree before any data moves.
    # Inside cp.step_checks data checks are deferred to the step's end and a call signature is
    # agreed once (validation is a function of it): no host sync here in steady state.
    sig = None if error is not None else signature(kind, scheme, balance, world, q, k, v, kind_kwargs)
    if sig is None or needs_agreement(group, sig):
        failed = comm.agree(None if error is None else str(error))
        if failed is not None:
            src, msg = failed
            raise ValueError(msg if src == comm.rank else f"{msg} (raised on CP rank {src})") from error
        mark_agreed(group, sig)
    if kind == "lightning":
        if scheme == "allgather":
            return lasp2_attention(q, k, v, kind_kwargs["slope"], comm, balance=balance,
                                   initial_state=kind_kwargs.get("initial_state"),
                                   output_final_state=bool(kind_kwargs.get("output_final_state", False)),
                                   cu_seqlens=kind_kwargs.get("cu_seqlens"), backend=kind_kwargs.get("backend", "auto"),
                                   cu_seqlens_unpadded=kind_kwargs.get("cu_seqlens_unpadded"))
        if scheme == "usp":
            return usp_lightning_attention(q, k, v, kind_kwargs["slope"], comm, balance=balance,
                                           ulysses_degree=kind_kwargs["ulysses_degree"],
                                           initial_state=kind_kwargs.get("initial_state"),
                                           output_final_state=bool(kind_kwargs.get("output_final_state", False)),
                                           backend=kind_kwargs.get("backend", "auto"))
        if scheme == "ring":
            return lasp1_attention(q, k, v, kind_kwargs["slope"], comm, balance=balance,
                                   initial_state=kind_kwargs.get("initial_state"),
                                   output_final_state=bool(kind_kwargs.get("output_final_state", False)),
                                   backend=kind_kwargs.get("backend", "auto"))
        return ulysses_attention(q, k, v, comm, kind=kind, balance=balance, kw=kind_kwargs)
    causal = kind == "s2" or kind_kwargs.get("causal", True)
    chunk_len = q.shape[1] // len(chunk_ids(0, world, balance))
    # S2 under tensor parallelism: the local kv heads are global heads head_off.. of total
    head_off, hkv = int(kind_kwargs.get("kv_head_offset", 0)), k.shape[2]
    total = kind_kwargs.get("total_kv_heads") or head_off + hkv
    if scheme == "allgather" and kind == "s2" and exchange_applies(kind_kwargs["layout"], chunk_len):
        return s2_exchange_attention(q, k, v, comm, balance=balance,
                                     op=softmax_family_op(kind, kind_kwargs, head_off, total),
                                     layout=kind_kwargs["layout"], kv_head_offset=head_off, total_kv_heads=total)
    if scheme == "allgather":
        return allgather_attention(q, k, v, comm, balance=balance, op=softmax_family_op(kind, kind_kwargs, head_off, total),
                                   causal=causal, gates=kind_kwargs.get("gates"),
                                   cu_seqlens=kind_kwargs.get("cu_seqlens"))
    if scheme == "usp":
        ud = kind_kwargs["ulysses_degree"]
        # member index in the Ulysses group (Comm.split_2d): rank % ulysses_degree
        op = softmax_family_op(kind, kind_kwargs, head_off + uly_kv_offset(comm.rank % ud, ud, hkv), total)
        return usp_attention(q, k, v, comm, balance=balance, op=op, causal=causal,
                             ulysses_degree=kind_kwargs["ulysses_degree"], gates=kind_kwargs.get("gates"))
    if scheme == "ring":
        return ring_attention(q, k, v, comm, balance=balance, op=softmax_family_op(kind, kind_kwargs, head_off, total),
                              causal=causal, gates=kind_kwargs.get("gates"))
    return ulysses_attention(q, k, v, comm, kind=kind, balance=balance, kw=kind_kwargs)


def _elt(dtype: Any) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, int) and dtype > 0:
        return dtype
    raise ValueError(f"dtype must be a torch.dtype or a byte count, got {dtype!r}")


def scheme_cost(kind: str, scheme: str, *, world: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                v_head_dim: Optional[int] = None, batch: int = 1, dtype: Any = torch.bfloat16,
                balance: str = "zigzag", gates_dtype: Any = None,
                output_final_state: bool = False, num_docs: Optional[int] = None,
                layout: Any = None, ulysses_degree: Optional[int] = None, rank: Optional[int] = None,
                kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> dict[str, dict[str, dict[str, int]]]:
    """Closed-form bytes received per rank and calls per layer: ``{"fwd"|"bwd": {op: {"bytes", "calls"}}}``.

    ``seq_len`` is the global length N; ``dtype`` the activation dtype (or bytes per element).
    allgather (softmax/s2/moh): ``(P-1)/P · N · b · H_kv · (d + dv) · e`` all-gather, the same as a
    reduce-scatter in backward; s2 uses the stride-aware exchange (``layout`` required; under TP
    also ``kv_head_offset`` / ``total_kv_heads``): one variable-size all-to-all of exactly the
    (kv head, block) pairs the rank's queries read from other ranks (fwd), and of the pairs the
    others read from it (bwd), ``block_size · b · (d+dv) · e`` bytes each, counted from the
    layout (:func:`seqpar.cp.s2_exchange.exchange_blocks`); it differs per rank (default: the
    busiest). lightning ring
    (LASP-1): one fp32 state ``b·H·dk·dv·4`` per hop from another rank; hops differ per rank, so
    pass ``rank`` (default: the busiest rank); ``output_final_state`` adds one all-gather of
    ``(P-1)`` states. ring: ``P-1`` passes of the local K/V (``N/P · b · H_kv · (d+dv) · e``
    each) forward; backward the same plus ``P`` passes of the fp32 dK/dV buffer. LASP-2: ``(P-1) · c · b · H · dk · dv · 4`` with ``c`` chunks per rank
    (2 zigzag, 1 contiguous), independent of N. Ulysses: one all-to-all per tensor, each
    ``(P-1)/P · (N/P) · b · heads_x · dim_x · e`` (q, k, v, o; MoH adds its gates; kv heads count
    ``max(H_kv, P)`` after replication). usp (``ulysses_degree`` U): the Ulysses all-to-alls over
    U, then the ring (softmax/s2/moh) or LASP-2 (lightning) over the P/U ring group. Varlen: pass ``batch=1`` and ``num_docs``; states (LASP-2,
    Ulysses final state) are per document.
    """
    if (kind, scheme) not in SUPPORTED:
        raise ValueError(f"kind={kind!r} with scheme={scheme!r} is not supported; supported pairs: {_pairs()}")
    p, n, e = world, seq_len, _elt(dtype)
    dv = head_dim if v_head_dim is None else v_head_dim
    cpr = len(chunk_ids(0, p, balance))
    if n % (cpr * p):
        raise ValueError(f"seq_len {n} must be divisible by {cpr * p} for balance={balance!r} at world={world}")
    fwd: dict[str, dict[str, int]] = {}
    bwd: dict[str, dict[str, int]] = {}

    def add(side: dict, op: str, nbytes: int) -> None:
        rec = side.setdefault(op, {"bytes": 0, "calls": 0})
        rec["bytes"] += nbytes
        rec["calls"] += 1

    nstate = batch if num_docs is None else num_docs  # state count per chunk: batch rows or documents
    if scheme == "allgather" and kind == "lightning":
        vol = (p - 1) * cpr * nstate * heads * head_dim * dv * 4
        add(fwd, "all_gather", vol)
        add(bwd, "reduce_scatter", vol)
    elif scheme == "allgather" and kind == "s2" and layout is None:
        raise ValueError("scheme_cost for kind='s2' needs layout= (the stride-aware exchange depends on it)")
    elif scheme == "allgather" and kind == "s2" and exchange_applies(layout, n // (p * cpr)):
        # one variable-size all-to-all of exactly the blocks each rank's queries read: per-rank bytes
        layout = layout.with_heads((total_kv_heads or kv_head_offset + kv_heads) * (heads // kv_heads))
        counts = exchange_blocks(layout, p, balance, n // (p * cpr), kv_heads, kv_head_offset, total_kv_heads)
        row = batch * layout.block_size * (head_dim + dv) * e
        per_rank = [(sum(counts[r]) * row, sum(counts[q][r] for q in range(p)) * row) for r in range(p)]
        f, bk = per_rank[rank] if rank is not None else max(per_rank, key=sum)
        add(fwd, "all_to_all", f)
        add(bwd, "all_to_all", bk)
    elif scheme == "allgather":
        vol = (p - 1) * (n // p) * batch * kv_heads * (head_dim + dv) * e
        add(fwd, "all_gather", vol)
        add(bwd, "reduce_scatter", vol)
    elif scheme == "ring" and kind == "lightning":
        # LASP-1 hops differ per rank: cost of ``rank`` (default: the rank receiving the most)
        hops = [hops_received(p, balance, r) for r in range(p)] if rank is None else [hops_received(p, balance, rank)]
        state = nstate * heads * head_dim * dv * 4
        for _ in range(max(f for f, _ in hops)):
            add(fwd, "send_recv", state)
        for _ in range(max(back for _, back in hops)):
            add(bwd, "send_recv", state)
        if output_final_state:  # the last chunk's owner replicates the final state: one all-gather
            add(fwd, "all_gather", (p - 1) * state)
            add(bwd, "reduce_scatter", (p - 1) * state)
    elif scheme == "ring":
        kv_local = (n // p) * batch * kv_heads * (head_dim + dv)
        for _ in range(p - 1):
            add(fwd, "send_recv", kv_local * e)
            add(bwd, "send_recv", kv_local * e)
        for _ in range(p if p > 1 else 0):
            add(bwd, "send_recv", kv_local * 4)  # fp32 dK/dV buffer, last hop returns it home
    elif scheme == "usp":
        u = ulysses_degree
        if not isinstance(u, int) or u < 1 or p % u:
            raise ValueError(f"scheme_cost for usp needs ulysses_degree dividing world={p}, got {u!r}")
        hk, ring = max(kv_heads, u), p // u

        def a2a_u(hx: int, dx: int, eb: int = e) -> int:
            return (u - 1) * (n // p) * batch * (hx // u) * dx * eb

        tensors = [a2a_u(heads, head_dim), a2a_u(hk, head_dim), a2a_u(hk, dv)]
        if kind == "moh":
            tensors.append(a2a_u(heads, 1, _elt(dtype if gates_dtype is None else gates_dtype)))
        for vol in tensors + [a2a_u(heads, dv)]:
            add(fwd, "all_to_all", vol)
            add(bwd, "all_to_all", vol)
        if kind == "lightning":  # LASP-2 over the ring group: u * cpr chunk states per ring rank, H/u heads
            vol = (ring - 1) * u * cpr * nstate * (heads // u) * head_dim * dv * 4
            add(fwd, "all_gather", vol)
            add(bwd, "reduce_scatter", vol)
            if output_final_state:  # final state gathered over the Ulysses group's heads
                vol = (u - 1) * (heads // u) * nstate * head_dim * dv * 4
                add(fwd, "all_gather", vol)
                add(bwd, "reduce_scatter", vol)
            return {"fwd": fwd, "bwd": bwd}
        kv_local = (n // p) * batch * hk * (head_dim + dv)  # u members' tokens, hk / u heads
        for _ in range(ring - 1):
            add(fwd, "send_recv", kv_local * e)
            add(bwd, "send_recv", kv_local * e)
        for _ in range(ring if ring > 1 else 0):
            add(bwd, "send_recv", kv_local * 4)
    elif scheme == "ulysses":
        hk = max(kv_heads, p)

        def a2a(hx: int, dx: int, eb: int = e) -> int:
            return (p - 1) * (n // p) * batch * (hx // p) * dx * eb

        tensors = [a2a(heads, head_dim), a2a(hk, head_dim), a2a(hk, dv)]
        if kind == "moh":
            tensors.append(a2a(heads, 1, _elt(dtype if gates_dtype is None else gates_dtype)))
        for vol in tensors:
            add(fwd, "all_to_all", vol)
            add(bwd, "all_to_all", vol)
        add(fwd, "all_to_all", a2a(heads, dv))
        add(bwd, "all_to_all", a2a(heads, dv))
        if kind == "lightning" and output_final_state:
            vol = (p - 1) * (heads // p) * nstate * head_dim * dv * 4
            add(fwd, "all_gather", vol)
            add(bwd, "reduce_scatter", vol)
    return {"fwd": fwd, "bwd": bwd}


def recommend(kind: str, *, world: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
              v_head_dim: Optional[int] = None, batch: int = 1, dtype: Any = torch.bfloat16,
              link_gbytes_per_s: float = 50.0, balance: str = "zigzag",
              layout: Any = None) -> tuple[str, dict[str, float]]:
    """Pick the scheme with the least communication time per layer (fwd + bwd) for ``kind``.

    Returns ``(scheme, {scheme: seconds})`` over the supported schemes whose constraints hold
    (Ulysses needs ``heads % world == 0``); s2 needs ``layout``. Time is bytes / ``link_gbytes_per_s`` (GB/s, 1e9 bytes);
    compute overlap is not modelled, so ring and all-gather tie on bytes and all-gather (fewer,
    larger calls) wins the tie. Lightning's ring (LASP-1) is left out: its chain is sequential.
    """
    if not link_gbytes_per_s > 0:
        raise ValueError(f"link_gbytes_per_s must be > 0, got {link_gbytes_per_s!r}")
    times: dict[str, float] = {}
    for scheme in ("allgather", "ulysses", "ring"):
        if (kind, scheme) not in SUPPORTED or (scheme == "ulysses" and heads % world):
            continue
        if (kind, scheme) == ("lightning", "ring"):  # LASP-1: few bytes but a P-long sequential chain
            continue
        if scheme == "ulysses" and kv_heads % world and world % kv_heads:
            continue
        cost = scheme_cost(kind, scheme, world=world, seq_len=seq_len, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, v_head_dim=v_head_dim, batch=batch, dtype=dtype, balance=balance,
                           layout=layout)
        total = sum(r["bytes"] for side in cost.values() for r in side.values())
        times[scheme] = total / (link_gbytes_per_s * 1e9)
    if not times:
        raise ValueError(f"no supported scheme for kind={kind!r} at world={world}; supported pairs: {_pairs()}")
    return min(times, key=lambda s: times[s]), times
