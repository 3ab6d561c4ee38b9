"""LASP-1 style state passing for Lightning linear attention (``scheme="ring"``), for comparison.

Every document's pieces form a chain in position order: piece ``w`` (its *wave*) starts from the
fp32 state after piece ``w-1`` of the same document, wherever that lives, and the first piece of a
document from its initial state (or zeros): the state resets at every document start across ranks.
Ranks run their pieces wave by wave: at wave w a rank receives, from each rank that ran a
predecessor at wave w-1, one message with all those states (batched over documents), runs all its
wave-w pieces in one kernel call (the pieces as segments of its ``cu_seqlens``), and sends the
states on. A rank's consecutive pieces of a document hand the state over locally (zigzag: chunks
P-1 and P). Backward runs the same waves in reverse with the state gradients (recomputing each
wave). The chain is sequential: latency grows with the waves (2P under zigzag), unlike LASP-2
(``scheme="allgather"``), which needs one all-gather and is the default. Bytes per message
``states · b · H · dk · dv · 4``; documents that start and end on one rank move nothing.

``initial_state`` enters each document's first piece (its owner gets the gradient; the other
ranks' share is 0). A document's final state lives on the owner of its last piece;
``output_final_state`` replicates the final states with one all-gather of the fp32 states
(non-owners contribute zeros, so the adjoint reduce-scatter hands each owner the sum of every
rank's final-state gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from seqpar.cp.comm import Comm, Pending, all_gather_autograd
from seqpar.cp.partition import Layout, cached_index
from seqpar.kernels._common import seed_host_ints


@dataclass(frozen=True)
class Wave:
    """This rank's pieces of one wave (indices into its pieces) and where their states come from /
    go to: ``recv``/``send`` ``(rank, positions in this wave)`` per peer, ``local_in`` ``(position,
    piece whose final state enters)``, ``first`` ``(position, document)``, ``finals`` ``(position,
    document)`` of the documents ending here."""

    pieces: tuple[int, ...]
    recv: tuple[tuple[int, tuple[int, ...]], ...]
    send: tuple[tuple[int, tuple[int, ...]], ...]
    local_in: tuple[tuple[int, int], ...]
    first: tuple[tuple[int, int], ...]
    finals: tuple[tuple[int, int], ...]


def waves(lay: Layout, rank: int) -> tuple[Wave, ...]:
    """The wave plan of ``rank`` (cached on the layout)."""
    def build() -> tuple[Wave, ...]:
        wave_of: dict[tuple[int, int], int] = {}  # (rank, piece) -> wave
        for chain in lay.doc_pieces:
            for w, ri in enumerate(chain):
                wave_of[ri] = w
        n_waves = max((len(c) for c in lay.doc_pieces), default=0)
        out = []
        for w in range(n_waves):
            mine = tuple(i for i in range(len(lay.pieces[rank])) if wave_of[(rank, i)] == w)
            recv: dict[int, list[int]] = {}
            send: dict[int, list[int]] = {}
            local_in, first, finals = [], [], []
            for pos, i in enumerate(mine):
                doc = lay.pieces[rank][i].doc
                chain = lay.doc_pieces[doc]
                if w == 0:
                    first.append((pos, doc))
                else:
                    r, j = chain[w - 1]
                    if r == rank:
                        local_in.append((pos, j))
                    else:
                        recv.setdefault(r, []).append(pos)
                if w + 1 < len(chain):
                    r, _ = chain[w + 1]
                    if r != rank:
                        send.setdefault(r, []).append(pos)
                else:
                    finals.append((pos, doc))
            out.append(Wave(mine, tuple((r, tuple(p)) for r, p in sorted(recv.items())),
                            tuple((r, tuple(p)) for r, p in sorted(send.items())), tuple(local_in), tuple(first),
                            tuple(finals)))
        return tuple(out)
    return lay.cached(("lasp1_waves", rank), build)


def hops(lay: Layout, rank: int) -> tuple[list[int], list[int]]:
    """States per message ``rank`` receives in forward (from predecessors) and in backward (state
    gradients from successors), in order."""
    fwd = [len(p) for wv in waves(lay, rank) for _, p in wv.recv]
    bwd = [len(p) for wv in reversed(waves(lay, rank)) for _, p in wv.send]
    return fwd, bwd


def _at(lay: Layout, rank: int, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Positions in a wave as a device index, built once (no host-to-device copy per layer)."""
    return cached_index(("lasp1_at", lay, rank, positions), device, lambda: torch.tensor(positions, dtype=torch.int64))


def _rows(lay: Layout, rank: int, w: int, device: torch.device) -> torch.Tensor:
    wave = waves(lay, rank)[w]
    return cached_index(("lasp1_rows", lay, rank, w), device, lambda: torch.cat(
        [torch.arange(lay.pieces[rank][i].local, lay.pieces[rank][i].local + lay.pieces[rank][i].length)
         for i in wave.pieces]))


def _put(buf: torch.Tensor, o: torch.Tensor, lay: Layout, rank: int, w: int) -> None:
    wave = waves(lay, rank)[w]
    if len(wave.pieces) == 1:
        p = lay.pieces[rank][wave.pieces[0]]
        buf[:, p.local:p.local + p.length] = o
    else:
        buf.index_copy_(1, _rows(lay, rank, w, buf.device), o)


def _take(buf: torch.Tensor, lay: Layout, rank: int, w: int) -> torch.Tensor:
    wave = waves(lay, rank)[w]
    if len(wave.pieces) == 1:
        p = lay.pieces[rank][wave.pieces[0]]
        return buf[:, p.local:p.local + p.length]
    return buf.index_select(1, _rows(lay, rank, w, buf.device))


class Lasp1Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, comm: Comm, lay: Layout, varlen: bool, backend: str):
        rank, plan = comm.rank, waves(lay, comm.rank)
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        state_shape = (b, h, dk, dv)
        out = q.new_zeros((b, q.shape[1], h, dv))
        final = q.new_zeros((lay.num_docs if varlen else b, h, dk, dv), dtype=torch.float32)
        after: dict[int, torch.Tensor] = {}  # piece -> its final state (for this rank's next piece)
        states_in, sends = [], []
        for w, wave in enumerate(plan):
            if not wave.pieces:
                states_in.append(None)
                continue
            s_in = q.new_zeros((len(wave.pieces), *state_shape), dtype=torch.float32)
            for src, positions in wave.recv:
                s_in.index_copy_(0, _at(lay, rank, positions, q.device), comm.recv(s_in[:len(positions)], src))
            for pos, j in wave.local_in:
                s_in[pos] = after.pop(j)
            if initial_state is not None:
                for pos, doc in wave.first:
                    s_in[pos] = initial_state[doc] if varlen else initial_state
            o, s_out = _run(*(_take(t, lay, rank, w) for t in (q, k, v)), slope, s_in, lay, rank, w, wave, backend)
            _put(out, o, lay, rank, w)
            states_in.append(s_in)
            for dst, positions in wave.send:
                sends.append(comm.send(s_out.index_select(0, _at(lay, rank, positions, q.device)), dst))
            for pos, i in enumerate(wave.pieces):
                after[i] = s_out[pos]
            for pos, doc in wave.finals:
                if varlen:
                    final[doc] = s_out[pos, 0]
                else:
                    final.copy_(s_out[pos])
        for p in sends:
            p.wait()
        ctx.save_for_backward(q, k, v, slope, *[s for s in states_in if s is not None])
        ctx.present = tuple(s is not None for s in states_in)
        ctx.comm, ctx.lay, ctx.varlen, ctx.backend = comm, lay, varlen, backend
        ctx.has_init = initial_state is not None
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, slope, *saved = ctx.saved_tensors
        comm: Comm = ctx.comm
        lay, rank, varlen = ctx.lay, comm.rank, ctx.varlen
        plan = waves(lay, rank)
        it = iter(saved)
        states_in = [next(it) if present else None for present in ctx.present]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_init = None
        if ctx.has_init:
            d_init = dfinal.new_zeros(dfinal.shape)
        grad_after: dict[int, torch.Tensor] = {}  # piece -> gradient of its final state (from its successor)
        sends: list[Pending] = []
        for w in reversed(range(len(plan))):
            wave, s_in = plan[w], states_in[w]
            if s_in is None:
                continue
            g_out = torch.zeros_like(s_in)
            for dst, positions in wave.send:  # successors elsewhere return the gradients of our states
                g_out.index_copy_(0, _at(lay, rank, positions, q.device), comm.recv(g_out[:len(positions)], dst))
            for pos, i in enumerate(wave.pieces):
                if i in grad_after:
                    g_out[pos] = grad_after.pop(i)
            for pos, doc in wave.finals:
                g_out[pos] += dfinal[doc] if varlen else dfinal
            with torch.enable_grad():
                qw, kw, vw = (_take(t, lay, rank, w).detach().requires_grad_() for t in (q, k, v))
                s = s_in.detach().requires_grad_()
                o, s_out = _run(qw, kw, vw, slope, s, lay, rank, w, wave, ctx.backend)
                gq, gk, gv, gs = torch.autograd.grad((o, s_out), (qw, kw, vw, s), (_take(dout, lay, rank, w), g_out))
            for buf, g in ((dq, gq), (dk, gk), (dv, gv)):
                _put(buf, g, lay, rank, w)
            for src, positions in wave.recv:
                sends.append(comm.send(gs.index_select(0, _at(lay, rank, positions, q.device)), src))
            for pos, j in wave.local_in:
                grad_after[j] = gs[pos]
            if d_init is not None:
                for pos, doc in wave.first:
                    if varlen:
                        d_init[doc] += gs[pos, 0]
                    else:
                        d_init += gs[pos]
        for p in sends:
            p.wait()
        return dq, dk, dv, None, d_init, None, None, None, None


def _run(q, k, v, slope, state, lay: Layout, rank: int, w: int, wave: Wave, backend: str):
    """One wave's pieces (their rows taken out, ``q [b, rows, H, dk]``) from ``state [n, b, H, dk, dv]``
    -> (outputs ``[b, rows, H, dv]``, states out ``[n, b, H, dk, dv]``)."""
    from seqpar.kernels import lightning_attention

    if len(wave.pieces) == 1:
        o, s = lightning_attention(q, k, v, slope, initial_state=state[0], output_final_state=True, backend=backend)
        return o, s[None]
    bounds = [0]
    for i in wave.pieces:
        bounds.append(bounds[-1] + lay.pieces[rank][i].length)
    cu = cached_index(("lasp1_cu", lay, rank, w), q.device, lambda: torch.tensor(bounds, dtype=torch.int32))
    o, s = lightning_attention(q, k, v, slope, initial_state=state[:, 0], output_final_state=True,
                               cu_seqlens=seed_host_ints(cu, bounds), backend=backend)
    return o, s[:, None]


def lasp1_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    layout: Layout, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    varlen: bool = False, backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local buffers ``q [b, L, H, dk]``, ``k/v [b, L, H_kv, dk|dv]`` -> (local output ``[b, L, H, dv]``,
    0 in padding slots; final states replicated — ``[num_docs, H, dk, dv]`` with ``varlen``, else
    ``[b, H, dk, dv]`` — or None)."""
    o, final = Lasp1Attention.apply(q, k, v, slope.detach(), initial_state, comm, layout, varlen, backend)
    if not output_final_state:
        return o, None
    return o, all_gather_autograd(final[None], comm, dim=0).sum(0)
