"""All-gather context parallelism (Llama 3 style) for softmax and moh.

Forward: one all-gather of K and V (packed into one tensor); the real tokens are put in the real
order (documents in order, padding dropped); each local query piece attends, at its position inside
its document, to its document's keys up to its own end (causal) or to the whole document.
Backward: the all-gather's adjoint, one reduce-scatter of dK/dV; dQ stays local. Cost per layer
(``L`` local slots, ``e`` bytes per element): ``(P-1) · L · b · H_kv · (d + dv) · e`` received in
forward (1 call) and the same in backward (1 call).

Sliding window (softmax ``window=w``): every rank still receives the whole all-gather (the bytes
above do not shrink with the window: for a window below the sequence use the ring, which receives
only the halo rows); each query piece attends only to the keys from its first row's window edge
``pos - w + 1`` on, so compute is O(piece x w) and the keys below get exact zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.local import LocalOp, scatter_pieces
from seqpar.cp.partition import Layout, cached_index


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


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, layout: Layout,
                        op: LocalOp, causal: bool = True, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local buffers ``q [b, L, H, d]``, ``k/v [b, L, H_kv, d]`` -> local output (autograd-exact; 0 in
    padding slots). Each piece attends only to its own document's keys."""
    lay, d = layout, k.shape[-1]
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
