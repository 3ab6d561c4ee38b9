"""Ring attention (softmax, s2, moh): K/V rotate around the group; partial results merge in fp32.

Forward: ``P`` steps; at step i this rank holds the K/V shard of rank ``rank - i``; the transfer for
step i+1 is posted before step i's compute. Each (local q chunk, held kv chunk) pair runs the local
op with absolute offsets and is folded into a running fp32 ``(out, lse)`` (:func:`merge_two`).
Under causal masking a pair whose kv chunk lies wholly after the q chunk is skipped (zigzag:
exactly the fully masked half-blocks).

Backward (flash-attn's ring backward): K/V rotate again; for each pair the local kernel's backward
runs with the *merged* ``(out, lse)`` of the query rows (``p = exp(s - lse)``, ``delta = rowsum(dO ·
out)`` give exactly this block's share of the gradient), so no block forward is recomputed and no
autograd graph is built. dQ accumulates locally; an fp32 dK/dV buffer travels with its K/V block:
each step adds this rank's share to the buffer that just arrived and posts it on before the next
block is computed (the hop overlaps that compute); one extra hop returns it to its owner.
Bytes: forward ``(P-1)`` passes of the local K/V; backward ``(P-1)`` K/V passes plus ``P`` fp32
dK/dV passes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from seqpar.cp.comm import Comm
from seqpar.cp.local import LocalOp
from seqpar.cp.merge import merge_two
from seqpar.cp.partition import chunk_ids


Chunks = Callable[[int], Sequence[int]]


def _pairs(comm: Comm, src: int, chunks: Chunks, causal: bool):
    """(local q chunk j, q chunk id, held kv chunk jj, kv chunk id) pairs that are not fully masked."""
    for j, qc in enumerate(chunks(comm.rank)):
        for jj, kc in enumerate(chunks(src)):
            if not causal or kc <= qc:
                yield j, qc, jj, kc


def ring_forward(q, k, v, gates, comm: Comm, chunks: Chunks, op: LocalOp, causal: bool):
    n_loc = len(chunks(comm.rank))
    c, d = q.shape[1] // n_loc, k.shape[-1]
    outs: list[Optional[torch.Tensor]] = [None] * n_loc
    lses: list[Optional[torch.Tensor]] = [None] * n_loc
    kv, src = torch.cat([k, v], dim=-1), comm.rank
    for step in range(comm.world):
        pending = comm.ring_pass([kv]) if step < comm.world - 1 else None
        for j, qc, jj, kc in _pairs(comm, src, chunks, causal):
            blk = kv[:, jj * c:(jj + 1) * c]
            o_b, l_b = op(q[:, j * c:(j + 1) * c], blk[..., :d], blk[..., d:], qc * c, kc * c,
                          None if gates is None else gates[:, j * c:(j + 1) * c])
            outs[j], lses[j] = merge_two(outs[j], lses[j], o_b, l_b)
        if pending is not None:
            kv, src = pending.wait()[0], (src - 1) % comm.world
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)  # type: ignore[arg-type]


def ring_backward(dout, q, k, v, gates, out, lse, comm: Comm, chunks: Chunks, op: LocalOp, causal: bool):
    n_loc = len(chunks(comm.rank))
    c, d = q.shape[1] // n_loc, k.shape[-1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, src = torch.cat([k, v], dim=-1), comm.rank
    dout = dout.to(q.dtype)
    hop = None  # in flight: the fp32 dK/dV buffer of the block held at the previous step
    for step in range(comm.world):
        pending = comm.ring_pass([kv]) if step < comm.world - 1 else None
        # this block's dK/dV share, from the kernel's backward with the merged (out, lse): no recompute
        block = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for j, qc, jj, kc in _pairs(comm, src, chunks, causal):
            qs, ks = slice(j * c, (j + 1) * c), slice(jj * c, (jj + 1) * c)
            gq, gk, gv = op.backward(q[:, qs], kv[:, ks, :, :d], kv[:, ks, :, d:], out[:, qs], lse[:, :, qs],
                                     dout[:, qs], qc * c, kc * c, None if gates is None else gates[:, qs])
            dq[:, qs] += gq.float()
            block[:, ks, :, :d] += gk.float()
            block[:, ks, :, d:] += gv.float()
        # the buffer that travels with this block arrives now (posted one step ago, overlapping the
        # compute above); add this rank's share and post it on at once: the next block's compute
        # overlaps the hop; after the last step the hop returns each buffer to its owner
        if hop is not None:
            block += hop.wait()[0]
        hop = comm.ring_pass([block]) if comm.world > 1 else None
        if pending is not None:
            kv, src = pending.wait()[0], (src - 1) % comm.world
    dkv = block if hop is None else hop.wait()[0]
    dk, dv = dkv[..., :d], dkv[..., d:]
    dg = None
    if gates is not None:  # MoH: dgates = rowsum(dout * out) / gates from the merged output, once
        active = gates > 0
        rowdot = (dout.float() * out).sum(-1)
        dg = torch.where(active, rowdot / torch.where(active, gates.float(), torch.ones_like(rowdot)), 0.0)
        dg = dg.to(gates.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gates, comm, chunks, op, causal):
        out, lse = ring_forward(q, k, v, gates, comm, chunks, op, causal)
        ctx.save_for_backward(q, k, v, gates, out, lse)
        ctx.comm, ctx.chunks, ctx.op, ctx.causal = comm, chunks, op, causal
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gates, out, lse = ctx.saved_tensors
        dq, dk, dv, dg = ring_backward(dout, q, k, v, gates, out, lse, ctx.comm, ctx.chunks, ctx.op, ctx.causal)
        return dq, dk, dv, dg, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str, op: LocalOp,
                   causal: bool = True, gates: Optional[torch.Tensor] = None,
                   chunks: Optional[Chunks] = None) -> torch.Tensor:
    """Local shards ``q [b, s_loc, H, d]``, ``k/v [b, s_loc, H_kv, d]`` (gates ``[b, s_loc, H]``) -> local output.

    ``chunks(ring_rank)`` lists the global chunk ids a ring member holds, in local order (default:
    the partition of ``balance``; USP passes the union over its Ulysses group).
    """
    if chunks is None:
        world = comm.world

        def chunks(r: int) -> Sequence[int]:
            return chunk_ids(r, world, balance)
    return RingAttention.apply(q, k, v, gates, comm, chunks, op, causal)
