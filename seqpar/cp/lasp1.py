"""LASP-1 style state passing for Lightning linear attention (``scheme="ring"``), for comparison.

Chunks are processed in sequence order: the owner of chunk ``i`` waits for the fp32 state after
chunk ``i-1``, runs the per-rank kernel from it, and sends its final state to the owner of chunk
``i+1`` (a local hand-over when both chunks live on one rank, as chunks P-1 and P do under zigzag).
Backward runs the same chain in reverse with the state gradients (recomputing each chunk).
The chain is sequential: total latency grows with P, unlike LASP-2 (``scheme="allgather"``), which
needs one all-gather and is the default. Bytes per hop ``b · H · dk · dv · 4``.

``initial_state`` enters chunk 0 (its owner gets the gradient; the other ranks' share is 0). The
final state lives on the owner of the last chunk; ``output_final_state`` replicates it with one
all-gather of the fp32 state (non-owners contribute zeros, so the adjoint reduce-scatter hands
the owner the sum of every rank's final-state gradient).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seqpar.cp.comm import Comm, Pending, all_gather_autograd
from seqpar.cp.partition import chunk_ids, num_chunks


def owners(world: int, balance: str) -> list[int]:
    """Owner rank of every chunk, in sequence order."""
    own = [0] * num_chunks(world, balance)
    for r in range(world):
        for cid in chunk_ids(r, world, balance):
            own[cid] = r
    return own


def hops_received(world: int, balance: str, rank: int) -> tuple[int, int]:
    """(forward, backward) states this rank receives from another rank."""
    own = owners(world, balance)
    fwd = sum(1 for cid in chunk_ids(rank, world, balance) if cid > 0 and own[cid - 1] != rank)
    bwd = sum(1 for cid in chunk_ids(rank, world, balance) if cid < len(own) - 1 and own[cid + 1] != rank)
    return fwd, bwd


def _run_chunk(q, k, v, slope, state, backend):
    from seqpar.kernels import lightning_attention

    return lightning_attention(q, k, v, slope, initial_state=state, output_final_state=True, backend=backend)


class Lasp1Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, comm: Comm, balance: str, backend: str):
        ids: Sequence[int] = chunk_ids(comm.rank, comm.world, balance)  # ascending chunk ids
        own = owners(comm.world, balance)
        c, (b, _, h, dk), dv = q.shape[1] // len(ids), q.shape, v.shape[-1]
        zero = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=q.device)
        outs, states_in, sends = [], [], []
        local = None  # state handed over between this rank's consecutive chunks
        final = zero  # the state after the last chunk, on its owner
        for j, cid in enumerate(ids):
            if cid == 0:
                s_in = zero if initial_state is None else initial_state
            elif own[cid - 1] == comm.rank:
                s_in = local
            else:
                s_in = comm.recv(zero, own[cid - 1])
            s = slice(j * c, (j + 1) * c)
            o, s_out = _run_chunk(q[:, s], k[:, s], v[:, s], slope, s_in, backend)
            outs.append(o)
            states_in.append(s_in)
            if cid + 1 == len(own):
                final = s_out
            else:
                if own[cid + 1] == comm.rank:
                    local = s_out
                else:
                    sends.append(comm.send(s_out, own[cid + 1]))
        for p in sends:
            p.wait()
        ctx.save_for_backward(q, k, v, slope, *states_in)
        ctx.comm, ctx.balance, ctx.backend = comm, balance, backend
        ctx.has_init = initial_state is not None
        return torch.cat(outs, dim=1), final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, slope, *states_in = ctx.saved_tensors
        comm: Comm = ctx.comm
        ids = chunk_ids(comm.rank, comm.world, ctx.balance)
        own = owners(comm.world, ctx.balance)
        c = q.shape[1] // len(ids)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        sends: list[Pending] = []
        local = None  # state gradient handed back between this rank's consecutive chunks
        d_init = torch.zeros_like(states_in[0]) if ctx.has_init else None  # only chunk 0's owner adds to it
        for j in reversed(range(len(ids))):
            cid = ids[j]
            if cid + 1 == len(own):
                g_out = dfinal
            elif own[cid + 1] == comm.rank:
                g_out = local
            else:
                g_out = comm.recv(states_in[j], own[cid + 1])
            s = slice(j * c, (j + 1) * c)
            with torch.enable_grad():
                qj, kj, vj = (t[:, s].detach().requires_grad_() for t in (q, k, v))
                s_in = states_in[j].detach().requires_grad_()
                o, s_out = _run_chunk(qj, kj, vj, slope, s_in, ctx.backend)
                gq, gk, gv, gs = torch.autograd.grad((o, s_out), (qj, kj, vj, s_in), (dout[:, s], g_out))
            dq[:, s], dk[:, s], dv[:, s] = gq, gk, gv
            if cid == 0 and d_init is not None:
                d_init = gs
            elif cid > 0:
                if own[cid - 1] == comm.rank:
                    local = gs
                else:
                    sends.append(comm.send(gs, own[cid - 1]))
        for p in sends:
            p.wait()
        return dq, dk, dv, None, d_init, None, None, None


def lasp1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    balance: str, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local shards ``q [b, s_loc, H, dk]``, ``k/v [b, s_loc, H_kv, dk|dv]`` -> (local output
    ``[b, s_loc, H, dv]``, final state ``[b, H, dk, dv]`` replicated, or None)."""
    o, final = Lasp1Attention.apply(q, k, v, slope.detach(), initial_state, comm, balance, backend)
    if not output_final_state:
        return o, None
    return o, all_gather_autograd(final[None], comm, dim=0).sum(0)
