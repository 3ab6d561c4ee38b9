"""All-gather context parallelism (Llama 3 style) for softmax and moh.

Forward: one all-gather of K and V (packed into one tensor); the real tokens are put in the real
order (documents in order, padding dropped); each local query piece attends, at its position inside
its document, to its document's keys up to its own end (causal) or to the whole document.
Backward: the all-gather's adjoint, one reduce-scatter of dK/dV; dQ stays local. Cost per layer
(``L`` local slots, ``e`` bytes per element): ``(P-1) · L · b · H_kv · (d + dv) · e`` received in
forward (1 call) and the same in backward (1 call).

Sliding window (softmax ``window=w``, causal): a query piece at positions ``[pos, end)`` of its
document reads only the keys ``[max(0, pos - w + 1), end)`` of that document, so instead of the
all-gather each rank receives exactly the rows of that range it does not hold (the window's *halo*:
at most ``w - 1`` tokens before each piece, per document, token-exact, for any partition and
padding) with one variable-size all-to-all into a compact buffer (:mod:`seqpar.cp.row_exchange`,
the machinery of the S2 exchange; backward: the reverse all-to-all of dK/dV). Cost per rank: its
halo rows ``x b · H_kv · (d + dv) · e`` forward (1 call), the rows other ranks read from it
backward (1 call); :func:`halo_rows` gives the exact ``[receiver][sender]`` counts that
``cp.scheme_cost`` and the ledger share. When the halo saves nothing on the busiest rank (the
window covers the documents: e.g. ``w >= N`` without padding slots under zigzag or contiguous,
where rank 0 resp. the last rank reads every other row) the plain all-gather runs instead (one
collective, the same bytes or fewer): :func:`uses_halo`; when no rank reads another's rows
(``w = 1``, documents ending at the rank cuts) nothing runs at all. Either way compute is
O(piece x w) and keys outside every window get exact zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.local import LocalOp, scatter_pieces
from seqpar.cp.partition import Layout, cached_index
from seqpar.cp.row_exchange import exchange, owner, row_counts, row_plan


def real_order(x: torch.Tensor, lay: Layout, dim: int = 1) -> torch.Tensor:
    """Rank-major slots (an all-gather / all-to-all of every rank's buffer) -> the real tokens in the
    real order (documents in order, padding dropped), along ``dim``."""
    if lay.identity:
        return x
    return x.index_select(dim, cached_index(("real_slots", lay), x.device, lambda: lay.real_slots))


def from_real_order(y: torch.Tensor, lay: Layout, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`real_order`: real tokens back to rank-major slots (padding slots 0)."""
    if lay.identity:
        return y
    shape = list(y.shape)
    shape[dim] = lay.world * lay.local_len
    idx = cached_index(("real_slots", lay), y.device, lambda: lay.real_slots)
    return y.new_zeros(shape).index_copy(dim, idx, y)


def window_rows(lay: Layout, window: int, receiver: int) -> torch.Tensor:
    """int64 real tokens held by other ranks that ``receiver``'s queries read under a causal sliding
    ``window`` (host, sorted): per piece, its document's tokens ``[max(0, pos - window + 1), pos)``."""
    def build() -> torch.Tensor:
        spans = [torch.arange(lay.doc_start[p.doc] + max(0, p.pos - window + 1), p.real)
                 for p in lay.pieces[receiver]]
        tok = torch.unique(torch.cat(spans or [torch.zeros(0, dtype=torch.int64)]))
        return tok[owner(lay)[tok] != receiver]
    return lay.cached(("window_rows", window, receiver), build)


def halo_rows(lay: Layout, window: int) -> tuple[tuple[int, ...], ...]:
    """``counts[q][r]``: tokens rank ``q`` receives from rank ``r`` under a sliding ``window`` (the
    halo exchange; every kv head of a token moves with it)."""
    return lay.cached(("halo_counts", window), lambda: row_counts(lay, lambda q: window_rows(lay, window, q), 1))


def uses_halo(lay: Layout, window: Optional[int]) -> bool:
    """True when the all-gather scheme moves the window's halo instead of all-gathering: a window is
    set and the busiest receiver's halo is smaller than the all-gather's ``(P - 1) · L`` rows (ties
    keep the all-gather: one collective, no index plan)."""
    if not window or lay.world == 1:
        return False
    return max(sum(c) for c in halo_rows(lay, window)) < (lay.world - 1) * lay.local_len


def _halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, lay: Layout,
                    op: LocalOp) -> torch.Tensor:
    rank, (b, n, hkv, d), w = comm.rank, k.shape, op.window
    plan = row_plan(lay, ("window_plan", w), lambda r: window_rows(lay, w, r), 1, rank, q.device, compact=True)
    kv = torch.cat([k, v], dim=-1)
    buf = exchange(kv.reshape(b, n, 1, -1), comm, plan).view(b, plan.length, hkv, kv.shape[-1])
    starts = lay.cached(("window_starts", w, rank), lambda: tuple(
        plan.at(lay.doc_start[p.doc] + max(0, p.pos - w + 1)) for p in lay.pieces[rank]))
    outs = []
    for p, lo in zip(lay.pieces[rank], starts):
        first = max(0, p.pos - w + 1)  # the piece's keys [first, end) sit contiguously in the buffer
        hi = lo + p.end - first
        o, _ = op(q[:, p.local:p.local + p.length], buf[:, lo:hi, :, :d], buf[:, lo:hi, :, d:], p.pos, first, None)
        outs.append(o)
    return scatter_pieces(outs, lay, rank, tail=(q.shape[2], v.shape[-1]), ties=(q, buf))


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, layout: Layout,
                        op: LocalOp, causal: bool = True, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local buffers ``q [b, L, H, d]``, ``k/v [b, L, H_kv, d]`` -> local output (autograd-exact; 0 in
    padding slots). Each piece attends only to its own document's keys; with ``op.window`` only the
    window's halo moves (:func:`uses_halo`)."""
    lay, d = layout, k.shape[-1]
    if causal and uses_halo(lay, op.window):
        return _halo_attention(q, k, v, comm, lay, op)
    kv = real_order(all_gather_autograd(torch.cat([k, v], dim=-1), comm, dim=1), lay)  # [b, R, hkv, d+dv]
    outs = []
    for p in lay.pieces[comm.rank]:
        first = max(0, p.pos - op.window + 1) if op.window else 0  # keys below the window's edge: none
        lo = lay.doc_start[p.doc] + first
        hi = lay.doc_start[p.doc] + (p.end if causal else lay.doc_real[p.doc])  # causal: later keys are all masked
        o, _ = op(q[:, p.local:p.local + p.length], kv[:, lo:hi, :, :d], kv[:, lo:hi, :, d:], p.pos, first,
                  None if gates is None else gates[:, p.local:p.local + p.length])
        outs.append(o)
    return scatter_pieces(outs, lay, comm.rank, tail=(q.shape[2], v.shape[-1]), ties=(q, kv))
