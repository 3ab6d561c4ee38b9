"""Ring attention (softmax, s2, moh): K/V rotate around the group; partial results merge in fp32.

Forward: ``P`` steps; at step i this rank holds the K/V shard of rank ``rank - i``; the transfer for
step i+1 is posted before step i's compute. Each (local q chunk, held kv chunk) pair runs the local
op with absolute offsets and is folded into a running fp32 ``(out, lse)`` (:func:`merge_two`).
Under causal masking a pair whose kv chunk lies wholly after the q chunk is skipped (zigzag:
exactly the fully masked half-blocks).

Backward (recompute, like flash attention): K/V rotate again; for each pair the block output is
recomputed and its gradient is the merge's adjoint, ``dO_b = w_b · dO`` and
``dLSE_b = w_b · Σ_d dO ⊙ (O_b - O)`` with ``w_b = exp(lse_b - lse)``; dQ accumulates locally and an
fp32 dK/dV buffer travels with its K/V block, one extra hop returning it to its owner.
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
    dg = None if gates is None else torch.zeros(gates.shape, dtype=torch.float32, device=q.device)
    kv, src = torch.cat([k, v], dim=-1), comm.rank
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # travels with its kv block
    dout = dout.float()
    for step in range(comm.world):
        pending = comm.ring_pass([kv]) if step < comm.world - 1 else None
        for j, qc, jj, kc in _pairs(comm, src, chunks, causal):
            qs, ks = slice(j * c, (j + 1) * c), slice(jj * c, (jj + 1) * c)
            with torch.enable_grad():
                qj = q[:, qs].detach().requires_grad_()
                kb = kv[:, ks, :, :d].detach().requires_grad_()
                vb = kv[:, ks, :, d:].detach().requires_grad_()
                gj = None if gates is None else gates[:, qs].detach().requires_grad_()
                o_b, l_b = op(qj, kb, vb, qc * c, kc * c, gj)
                lse_j = lse[:, :, qs]
                w = torch.exp(l_b.detach() - torch.where(torch.isinf(lse_j), torch.zeros_like(lse_j), lse_j))
                w = w.transpose(1, 2).unsqueeze(-1)  # [b, c, h, 1]
                do_j = dout[:, qs]
                g_o = w * do_j
                g_l = (w * do_j * (o_b.detach().float() - out[:, qs])).sum(-1).transpose(1, 2)
                g_o = torch.where(w > 0, g_o, torch.zeros((), device=g_o.device))
                inputs = [qj, kb, vb] + ([] if gj is None else [gj])
                grads = torch.autograd.grad((o_b, l_b), inputs, (g_o.to(o_b.dtype), g_l))
            dq[:, qs] += grads[0].float()
            dkv[:, ks, :, :d] += grads[1].float()
            dkv[:, ks, :, d:] += grads[2].float()
            if dg is not None:
                dg[:, qs] += grads[3].float()
        # the buffer follows its block; after the last step this hop returns it to its owner
        if comm.world > 1:
            dkv = comm.ring_pass([dkv]).wait()[0]
        if pending is not None:
            kv, src = pending.wait()[0], (src - 1) % comm.world
    dk, dv = dkv[..., :d], dkv[..., d:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(gates.dtype)


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
