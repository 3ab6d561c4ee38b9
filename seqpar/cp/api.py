"""``cp.attention``: one entry for every attention kind under every CP scheme, and the closed-form
communication cost of each pair (``cp.scheme_cost``) that the ledger matches exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from seqpar.cp.allgather import allgather_attention, halo_rows, uses_halo
from seqpar.cp.comm import Comm
from seqpar.cp.lasp1 import hops, lasp1_attention
from seqpar.cp.lasp2 import lasp2_attention, state_slots
from seqpar.cp.local import softmax_family_op
from seqpar.cp.partition import BALANCES, Layout, Partition, resolve, resolve_group
from seqpar.cp.ring import ring_attention, step_bytes
from seqpar.cp.row_exchange import exchange_cost
from seqpar.cp.s2_exchange import exchange_rows, s2_exchange_attention
from seqpar.cp.s2_heads import PLACEMENTS, head_placement
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
_VARLEN = {"cu_seqlens", "cu_seqlens_unpadded", "ulysses_degree"}  # every kind, every scheme
_KWARGS = {
    "softmax": {"sm_scale", "causal", "window", "backend"} | _VARLEN,
    "s2": {"layout", "sm_scale", "backend", "kv_head_offset", "total_kv_heads", "head_placement"} | _VARLEN,
    "lightning": {"slope", "initial_state", "output_final_state", "backend"} | _VARLEN,
    "moh": {"gates", "sm_scale", "causal", "backend"} | _VARLEN,
}


def _pairs() -> str:
    return ", ".join(f"{k}x{s}" for k, s in sorted(SUPPORTED))


def _partition(b: int, s: int, world: int, balance: Optional[str], seq_len: Optional[int],
               part: Optional[Partition], kw: dict[str, Any]) -> Partition:
    """The one partition of this call: given, or resolved from (balance, documents, lengths)."""
    from seqpar.kernels._common import check_cu_seqlens

    cu, real = kw.get("cu_seqlens"), kw.get("cu_seqlens_unpadded")
    if part is not None:
        if not isinstance(part, Partition):
            raise ValueError(f"partition must be a seqpar.cp.Partition (cp.make_partition(...)), got {type(part).__name__}")
        if cu is not None or real is not None or seq_len is not None:
            raise ValueError("pass either partition= or cu_seqlens / cu_seqlens_unpadded / seq_len (the partition "
                             "already holds the documents and the length)")
        if balance is not None and balance != part.balance:
            raise ValueError(f"balance={balance!r} disagrees with the partition's {part.balance!r}; leave balance unset")
        if part.world != world or part.local_len != s:
            raise ValueError(f"the partition is for {part.world} ranks x {part.local_len} local tokens; this call has "
                             f"{world} ranks x {s} local tokens (q.shape[1])")
        if part.varlen and b != 1:
            raise ValueError(f"varlen (a partition with documents) needs batch == 1 (documents packed along seq), "
                             f"got batch {b}")
        return part
    balance = "zigzag" if balance is None else balance
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int (the global length before padding), got {seq_len!r}")
    n = world * s if seq_len is None else seq_len
    if cu is not None:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
            raise ValueError("cu_seqlens must be the global int32 tensor [num_docs + 1] (over all ranks)")
        n_cu = _last(cu)
        check_cu_seqlens(cu, b, n_cu, name="cu_seqlens (global, over all ranks)")
        if seq_len is not None and seq_len != n_cu:
            raise ValueError(f"seq_len={seq_len} disagrees with cu_seqlens[-1] = {n_cu}; pass one of them")
        n = n_cu
    if real is not None:
        if not isinstance(real, torch.Tensor) or real.dim() != 1 or real.dtype != torch.int32:
            raise ValueError("cu_seqlens_unpadded must be an int32 tensor [num_docs + 1] (the real boundaries)")
    if n > world * s:
        raise ValueError(f"the global length {n} does not fit {world} ranks x {s} local tokens (q.shape[1]); "
                         f"shard with cp.shard / cp.partition, which give ceil({n} / {world}) = "
                         f"{-(-n // world)} per rank")
    return resolve(world, n, balance=balance, local_len=s, cu_seqlens=cu, cu_seqlens_unpadded=real,
                   block_size=_stride_block(balance, kw.get("layout")))


def _stride_block(balance: str, layout: Any) -> Optional[int]:
    """``balance="stride"`` cuts at S2 blocks: the block size of the call's S2 layout (None otherwise;
    the partition then names what is missing)."""
    return getattr(layout, "block_size", None) if balance == "stride" else None


def _last(cu: torch.Tensor) -> int:
    from seqpar.kernels._common import host_ints

    return host_ints(cu)[-1]


def _validate(q, k, v, kind: str, scheme: str, balance: Optional[str], world: int, seq_len: Optional[int],
              part: Optional[Partition], kw: dict[str, Any]) -> Partition:
    from seqpar.kernels import S2Layout
    from seqpar.kernels._common import check_data, check_qkv

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if (kind, scheme) not in SUPPORTED:
        raise ValueError(f"kind={kind!r} with scheme={scheme!r} is not supported; supported pairs: {_pairs()}")
    extra = set(kw) - _KWARGS[kind]
    if extra:
        raise ValueError(f"unexpected keyword(s) {sorted(extra)} for kind={kind!r}; accepted: {sorted(_KWARGS[kind])}")
    b, s, _, h, hkv, d = check_qkv(q, k, v, same_dv=kind != "lightning")
    part = _partition(b, s, world, balance, seq_len, part, kw)
    if kind == "softmax" and "window" in kw:
        from seqpar.kernels._common import check_window

        kw["window"] = check_window(kw["window"], kw.get("causal", True)) or None
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
        if "head_placement" in kw:
            if scheme not in ("ulysses", "usp"):
                raise ValueError(f"head_placement chooses the heads of each rank under scheme='ulysses' or 'usp'; "
                                 f"scheme={scheme!r} computes every head on every rank: leave it unset")
            if kw["head_placement"] not in PLACEMENTS:
                raise ValueError(f"head_placement must be one of {PLACEMENTS}, got {kw['head_placement']!r}")
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
    init = kw.get("initial_state")
    if kind == "lightning" and init is not None:  # replicated, but only some ranks read it: check here
        from seqpar.kernels.lightning.api import _check_state

        _check_state("initial_state", init, part.num_docs if part.varlen else b, h, q.shape[-1], v.shape[-1],
                     q.device)
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
    return part


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str, scheme: str = "allgather",
              group=None, balance: Optional[str] = None, seq_len: Optional[int] = None,
              partition: Optional[Partition] = None, **kind_kwargs: Any):
    """Context-parallel attention on this rank's shards; equals the single-device op on the full input.

    Args:
        q: ``[batch, L, heads, dim]``, k, v: ``[batch, L, kv_heads, dim]`` — this rank's local buffers
            as produced by ``cp.shard(x, group, dim=1, balance=balance, cu_seqlens=...)`` (or a
            :class:`~seqpar.cp.Partition`'s ``shard``): ``L = ceil(N / P)`` slots, the spare ones
            padding.
        kind: "softmax" | "s2" | "lightning" | "moh".
        scheme: "allgather" (for lightning: LASP-2) | "ring" | "ulysses" | "usp" (see SUPPORTED: every
            pair; lightning "ring" is LASP-1 state passing, lightning "usp" is Ulysses x LASP-2).
        group: the CP process group (None = default group).
        balance: "zigzag" (default; every document cut in 2P chunks, rank r holds chunks r and
            2P-1-r), "contiguous", or for kind="s2" "stride" (S2 blocks of each document round robin,
            block b on rank b mod P; the block size is the layout's; other kinds take that
            partition as ``partition=cp.make_partition(..., balance="stride", block_size=...)``);
            the joint cost balancer ("cost") needs the whole model's
            cost model, so it comes as ``partition=cp.make_partition(..., balance="cost", cost=...)``.
        seq_len: the global length N before padding (default: ``cu_seqlens[-1]``, else ``P · L``).
            Pass it when ``N`` is not a multiple of ``P``, so the padding slots are known.
        partition: a resolved :class:`~seqpar.cp.Partition` (``cp.make_partition``; any balancer's),
            instead of ``balance`` / ``seq_len`` / ``cu_seqlens``.
        kind_kwargs: softmax: ``sm_scale, causal, window, backend`` (``window``: Mistral's sliding
            window, query ``i`` sees keys ``i - window < j <= i`` of its document; allgather moves
            only the window's halo rows (one all-to-all; the plain all-gather when the halo would
            save nothing, see ``scheme_cost``), the ring moves only the window's halo
            rows and skips hops and key pieces outside it, ulysses / usp pass it to the local
            kernel); s2: ``layout, sm_scale, backend,
            kv_head_offset, total_kv_heads`` (tensor parallelism: the local kv heads are global kv
            heads ``kv_head_offset ..`` of ``total_kv_heads``, so the pattern is the model's),
            with scheme="ulysses" / "usp" ``head_placement``: "balanced" (default: each rank gets kv
            heads of complementary stride residues, dense heads spread, when that strictly lowers
            the busiest rank's S2 blocks; :func:`seqpar.cp.s2_heads.head_placement`) or
            "contiguous" (rank ``u`` holds kv heads ``u·H_kv/P ..``);
            lightning: ``slope, initial_state, output_final_state, backend``; moh: ``gates`` (this
            rank's ``[batch, L, heads]``), ``sm_scale, causal, backend``; any kind: ``cu_seqlens``
            (the *global* int32 ``[num_docs + 1]`` of the packed sequence, batch 1, documents of any
            length: attention, S2's layout and Lightning's state restart at every document),
            ``cu_seqlens_unpadded`` (with Megatron's padded documents: the real boundaries; the
            pads are then no real tokens), with scheme="usp": ``ulysses_degree`` (divides P; ring
            over P/degree groups).

    Returns:
        softmax / s2 / moh: the local output ``[batch, L, heads, dv]``; lightning: ``(o, final_state)``
        (final per document with ``cu_seqlens``, replicated on every rank, or None). Padding slots
        get output 0 and pass no gradient.

    Every argument is validated on this rank before any data moves (no divisibility limits: any
    length, any document lengths). Data-dependent checks (MoH gates >= 0, Lightning slopes) may
    fail on one rank only, so the ranks agree first (``Comm.agree``: one int32 all-reduce, not in
    the ledger) and every rank raises the failing rank's ValueError; nobody is left waiting in a
    collective. Inside ``cp.step_checks()`` (a training step) the data checks are read once at the
    step's end and a call signature is agreed only the first time: no host sync per layer.
    """
    _, world = resolve_group(group)
    part = None
    try:
        part = _validate(q, k, v, kind, scheme, balance, world, seq_len, partition, kind_kwargs)
        error = None
    except ValueError as e:
        if isinstance(group, tuple):  # no process group to agree over (validation-only use)
            raise
        error = e
    comm = Comm(group)
    # Data-dependent checks (gates, slopes) can fail on one rank only: agree before any data moves.
    # Inside cp.step_checks data checks are deferred to the step's end and a call signature is
    # agreed once (validation is a function of it): no host sync here in steady state.
    sig = None if error is not None else signature(kind, scheme, part, world, q, k, v, kind_kwargs)
    if sig is None or needs_agreement(group, sig):
        failed = comm.agree(None if error is None else str(error))
        if failed is not None:
            src, msg = failed
            raise ValueError(msg if src == comm.rank else f"{msg} (raised on CP rank {src})") from error
        mark_agreed(group, sig)
    kw = kind_kwargs
    if kind == "lightning":
        common = dict(initial_state=kw.get("initial_state"), output_final_state=bool(kw.get("output_final_state")),
                      backend=kw.get("backend", "auto"))
        if scheme == "allgather":
            return lasp2_attention(q, k, v, kw["slope"], comm, layout=part, varlen=part.varlen, **common)
        if scheme == "usp":
            return usp_lightning_attention(q, k, v, kw["slope"], comm, layout=part, ulysses_degree=kw["ulysses_degree"],
                                           varlen=part.varlen, **common)
        if scheme == "ring":
            return lasp1_attention(q, k, v, kw["slope"], comm, layout=part, varlen=part.varlen, **common)
        return ulysses_attention(q, k, v, comm, kind=kind, layout=part, kw=kw)
    causal = kind == "s2" or kw.get("causal", True)
    # S2 under tensor parallelism: the local kv heads are global heads head_off.. of total
    head_off, hkv = int(kw.get("kv_head_offset", 0)), k.shape[2]
    total = kw.get("total_kv_heads") or head_off + hkv
    if scheme == "allgather" and kind == "s2":
        return s2_exchange_attention(q, k, v, comm, layout=part, op=softmax_family_op(kind, kw, head_off, total),
                                     s2_layout=kw["layout"], kv_head_offset=head_off, total_kv_heads=total)
    if scheme == "allgather":
        return allgather_attention(q, k, v, comm, layout=part, op=softmax_family_op(kind, kw, head_off, total),
                                   causal=causal, gates=kw.get("gates"))
    placement = None
    if kind == "s2" and scheme in ("ulysses", "usp"):
        degree = world if scheme == "ulysses" else kw["ulysses_degree"]
        if kw.get("head_placement", "balanced") == "balanced" and hkv >= 2 * degree:  # else nothing to choose
            placement = head_placement(part, kw["layout"], heads=q.shape[2], kv_heads=hkv, degree=degree,
                                       kv_head_offset=head_off, total_kv_heads=total)
    if scheme == "usp":
        ud = kw["ulysses_degree"]
        # member index in the Ulysses group (Comm.split_2d): rank % ulysses_degree
        member = comm.rank % ud
        op = softmax_family_op(kind, kw, head_off + uly_kv_offset(member, ud, hkv), total,
                               None if placement is None else placement.runs(member, head_off))
        return usp_attention(q, k, v, comm, layout=part, op=op, causal=causal, ulysses_degree=ud,
                             gates=kw.get("gates"), placement=placement)
    if scheme == "ring":
        return ring_attention(q, k, v, comm, layout=part, op=softmax_family_op(kind, kw, head_off, total),
                              causal=causal, gates=kw.get("gates"))
    return ulysses_attention(q, k, v, comm, kind=kind, layout=part, kw=kw, placement=placement)


def _elt(dtype: Any) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, int) and dtype > 0:
        return dtype
    raise ValueError(f"dtype must be a torch.dtype or a byte count, got {dtype!r}")


def scheme_cost(kind: str, scheme: str, *, world: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                v_head_dim: Optional[int] = None, batch: int = 1, dtype: Any = torch.bfloat16,
                balance: str = "zigzag", gates_dtype: Any = None, output_final_state: bool = False,
                layout: Any = None, ulysses_degree: Optional[int] = None, rank: Optional[int] = None,
                kv_head_offset: int = 0, total_kv_heads: Optional[int] = None, causal: bool = True,
                cu_seqlens: Any = None, cu_seqlens_unpadded: Any = None,
                partition: Optional[Partition] = None,
                window: Optional[int] = None) -> dict[str, dict[str, dict[str, int]]]:
    """Bytes received per rank and calls per layer: ``{"fwd"|"bwd": {op: {"bytes", "calls"}}}``, exactly
    what the ledger records (``cp.comm_ledger``).

    ``seq_len`` is the global length N (any: ``L = ceil(N / P)`` slots per rank, the spare ones
    padding that moves with the rest); ``dtype`` the activation dtype (or bytes per element);
    ``cu_seqlens`` / ``cu_seqlens_unpadded`` the packed documents (host values; ``batch=1``) or a
    resolved ``partition``. Closed forms (``e`` bytes per element, ``b`` batch):

    - allgather (softmax/moh): ``(P-1) · L · b · H_kv · (d + dv) · e`` all-gather, the same as a
      reduce-scatter in backward.
    - allgather, s2 (stride-aware exchange; ``layout`` required, under TP also ``kv_head_offset`` /
      ``total_kv_heads``): one variable-size all-to-all of exactly the (kv head, token) rows the
      rank's queries read from other ranks (fwd) and of the rows others read from it (bwd),
      ``b · (d + dv) · e`` bytes each (:func:`seqpar.cp.s2_exchange.exchange_rows`).
    - ring (softmax/s2/moh): per step, the key pieces of rank ``r - i`` that rank r's queries read
      (same document; causal: starting before the query piece ends), ``b · H_kv · (d+dv) · e`` per
      row; a step with nothing to receive records nothing. Backward: the same K/V receives plus the
      fp32 dK/dV of the rank's own pieces that each other rank read (``4`` bytes per element).
      Without documents under zigzag (``c = N / 2P``): rank r receives ``(2P - 2 - r) · c`` rows
      forward and ``(P - 1 + r) · c`` fp32 rows of dK/dV back; contiguous (causal) only from the
      ranks before it (rank 0: nothing). Softmax ``window=w``: a key piece moves only when some
      query piece's window reaches it, and only its rows from the earliest reader's window edge
      on (the halo): without documents, at most ``w - 1`` rows per (reader, key piece) before the
      reader's own rows; hops wholly outside every window record nothing.
    - allgather with a softmax ``window=w`` (causal): one variable-size all-to-all of exactly the
      tokens of other ranks inside the windows of the rank's query pieces (per piece its document's
      ``[max(0, pos - w + 1), pos)``: at most ``w - 1`` rows per piece), ``b · H_kv · (d + dv) · e``
      bytes each, and backward the rows other ranks read from it
      (:func:`seqpar.cp.allgather.halo_rows`); when that saves nothing on the busiest rank
      (:func:`seqpar.cp.allgather.uses_halo`, e.g. ``w >= N``) the plain all-gather above.
    - LASP-2 (lightning allgather): ``(P-1) · S · b · H · dk · dv · 4`` with ``S`` the states the
      busiest rank exports (:func:`seqpar.cp.lasp2.state_slots`: 2 under zigzag, 1 contiguous;
      with ``cu_seqlens`` about 2 per document under zigzag, only the documents that cross a rank
      boundary when contiguous; every piece with ``output_final_state``), independent of N; 1
      all-gather, backward 1 reduce-scatter (none when no document crosses a rank).
    - LASP-1 (lightning ring): per message one fp32 state ``b·H·dk·dv·4`` per document it carries
      (:func:`seqpar.cp.lasp1.hops`); ``output_final_state`` adds one all-gather of ``(P-1)`` states
      per document (backward: reduce-scatter).
    - ulysses: one all-to-all per tensor, each ``(P-1) · L · b · (heads_x / P) · dim_x · e`` (q, k, v,
      o; MoH adds its gates; kv heads count ``max(H_kv, P)`` after replication); lightning's
      ``output_final_state`` adds an all-gather of ``(P-1) · (H/P)`` states per document.
    - usp (``ulysses_degree`` U): the Ulysses all-to-alls over U, then the ring (softmax/s2/moh) or
      LASP-2 (lightning) over the P/U ring group on the merged buffers (heads ``max(H_kv, U) / U``).

    Ring, LASP-1 and the S2 exchange differ per rank: pass ``rank`` (default: the busiest rank).
    ``balance="stride"`` takes its block from ``layout`` (kind s2; other kinds: ``partition=``).
    """
    if (kind, scheme) not in SUPPORTED:
        raise ValueError(f"kind={kind!r} with scheme={scheme!r} is not supported; supported pairs: {_pairs()}")
    p, e = world, _elt(dtype)
    part = partition if partition is not None else resolve(
        p, seq_len, balance=balance, cu_seqlens=cu_seqlens, cu_seqlens_unpadded=cu_seqlens_unpadded,
        block_size=_stride_block(balance, layout))
    if part.world != p:
        raise ValueError(f"the partition is for {part.world} ranks, world={p}")
    n_loc = part.local_len
    dv = head_dim if v_head_dim is None else v_head_dim
    nstate = part.num_docs if part.varlen else batch  # states per message slot: documents or batch rows
    rows_state = 1 if part.varlen else batch  # a LASP state slot holds b rows (documents: one each)
    state = heads * head_dim * dv * 4
    causal = causal if kind in ("softmax", "moh") else True
    if window is not None and kind != "softmax":
        raise ValueError(f"window is a kind='softmax' option (sliding-window softmax), got kind={kind!r}")
    from seqpar.kernels._common import check_window

    window = check_window(window, causal)

    def add(side: dict, op: str, nbytes: int) -> None:
        rec = side.setdefault(op, {"bytes": 0, "calls": 0})
        rec["bytes"] += nbytes
        rec["calls"] += 1

    def ring_cost(lay: Layout, r: int, fwd: dict, bwd: dict, row: int) -> None:
        got, back = step_bytes(lay, r, causal, window)
        for n in got:
            if n:
                add(fwd, "send_recv", n * row * e)
        for n, m in zip(got, back):
            if n:
                add(bwd, "send_recv", n * row * e)
            if m:
                add(bwd, "send_recv", m * row * 4)  # the fp32 dK/dV of this rank's pieces comes back

    def exchanged(counts: tuple, r: int, row: int, fwd: dict, bwd: dict) -> None:
        nbytes = exchange_cost(counts, r, row * e)
        if nbytes is not None:  # else nothing moves anywhere: no all-to-all
            add(fwd, "all_to_all", nbytes[0])
            add(bwd, "all_to_all", nbytes[1])

    def a2a(fwd: dict, bwd: dict, u: int, extra_final: bool) -> int:
        hk = max(kv_heads, u)

        def vol(hx: int, dx: int, eb: int = e) -> int:
            return (u - 1) * n_loc * batch * (hx // u) * dx * eb
        tensors = [vol(heads, head_dim), vol(hk, head_dim), vol(hk, dv)]
        if kind == "moh":
            tensors.append(vol(heads, 1, _elt(dtype if gates_dtype is None else gates_dtype)))
        for x in tensors + [vol(heads, dv)]:
            add(fwd, "all_to_all", x)
            add(bwd, "all_to_all", x)
        if kind == "lightning" and extra_final:  # final states gathered over the heads
            x = (u - 1) * (heads // u) * nstate * head_dim * dv * 4
            add(fwd, "all_gather", x)
            add(bwd, "reduce_scatter", x)
        return hk

    def cost(r: int) -> dict[str, dict[str, dict[str, int]]]:
        fwd: dict[str, dict[str, int]] = {}
        bwd: dict[str, dict[str, int]] = {}
        if scheme == "allgather" and kind == "lightning":
            slots = state_slots(part, output_final_state)
            if slots:  # no all-gather at all when no document crosses a rank
                add(fwd, "all_gather", (p - 1) * slots * rows_state * state)
                add(bwd, "reduce_scatter", (p - 1) * slots * rows_state * state)
        elif scheme == "allgather" and kind == "s2":
            lay = layout.with_heads((total_kv_heads or kv_head_offset + kv_heads) * (heads // kv_heads))
            exchanged(exchange_rows(part, lay, kv_heads, kv_head_offset, total_kv_heads), r, batch * (head_dim + dv),
                      fwd, bwd)
        elif scheme == "allgather" and uses_halo(part, window):  # softmax window: the halo exchange
            exchanged(halo_rows(part, window), r, batch * kv_heads * (head_dim + dv), fwd, bwd)
        elif scheme == "allgather":
            x = (p - 1) * n_loc * batch * kv_heads * (head_dim + dv) * e
            add(fwd, "all_gather", x)
            add(bwd, "reduce_scatter", x)
        elif scheme == "ring" and kind == "lightning":
            got, back = hops(part, r)
            for n in got:
                add(fwd, "send_recv", n * rows_state * state)
            for n in back:
                add(bwd, "send_recv", n * rows_state * state)
            if output_final_state:  # the last pieces' owners replicate the final states: one all-gather
                add(fwd, "all_gather", (p - 1) * nstate * state)
                add(bwd, "reduce_scatter", (p - 1) * nstate * state)
        elif scheme == "ring":
            ring_cost(part, r, fwd, bwd, batch * kv_heads * (head_dim + dv))
        elif scheme == "usp":
            u = ulysses_degree
            if isinstance(u, bool) or not isinstance(u, int) or u < 1 or p % u:
                raise ValueError(f"scheme_cost for usp needs ulysses_degree dividing world={p}, got {u!r}")
            hk = a2a(fwd, bwd, u, output_final_state)
            merged = part.merged(u)
            if kind == "lightning":  # LASP-2 over the ring group on the merged buffers, H/u heads
                slots = state_slots(merged, output_final_state)
                if slots:
                    x = (p // u - 1) * slots * rows_state * (heads // u) * head_dim * dv * 4
                    add(fwd, "all_gather", x)
                    add(bwd, "reduce_scatter", x)
            else:
                ring_cost(merged, r // u, fwd, bwd, batch * (hk // u) * (head_dim + dv))
        else:  # ulysses
            a2a(fwd, bwd, p, output_final_state)
        return {"fwd": fwd, "bwd": bwd}

    if kind == "s2" and scheme == "allgather" and layout is None:
        raise ValueError("scheme_cost for kind='s2' needs layout= (the stride-aware exchange depends on it)")
    if rank is not None:
        return cost(rank)
    per_rank = [cost(r) for r in range(p)]
    return max(per_rank, key=lambda c: sum(x["bytes"] for side in c.values() for x in side.values()))
