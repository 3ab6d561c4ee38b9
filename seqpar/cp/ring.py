"""Ring attention (softmax, s2, moh): K/V travel between ranks; partial results merge in fp32.

Forward: ``P`` steps; at step i rank r computes with the K/V pieces of rank ``src = r - i`` that its
queries read, received directly from ``src`` (and sends its own pieces to ``r + i``); the transfer
for step i+1 is posted before step i's compute. What moves is decided by a per-step plan built once
per partition on the host (:func:`plan`): a key piece is sent to a rank only when one of that rank's
query pieces of the *same document* reads it (causal: it starts before the query piece ends), so
key blocks of other documents are neither computed nor sent, and a hop that holds nothing the
receiver needs posts no transfer at all. Each (query piece, key piece) pair runs the local op with
the positions inside their document (S2's layout restarts at every document) and is folded into
the running fp32 ``(out, lse)`` (:func:`merge_two`).

Backward (flash-attn's ring backward): the K/V pieces move again; for each pair the local kernel's
backward runs with the *merged* ``(out, lse)`` of the query rows (``p = exp(s - lse)``, ``delta =
rowsum(dO · out)`` give exactly this block's share of the gradient), so no block forward is
recomputed and no autograd graph is built. dQ accumulates locally; the fp32 dK/dV of the pieces
received at step i goes straight back to their owner, posted right after the step's compute and
waited for after the next step's (the return overlaps that compute).

Sliding-window softmax (``window=W`` on the local op): a key piece is needed only when its last
key lies inside some same-document query piece's window (``q.pos - k_last < W``), and then only its
rows from the earliest reader's window edge on, so a rank receives just the halo before its pieces
(contiguous: ``W - 1`` rows from rank ``r - 1``) and hops wholly outside every window post nothing;
each pair's key range starts at its query piece's window edge (the kernel skips the rest by tile).

Bytes (per rank, from the plan): forward, the pieces received; backward, the same pieces again
plus the fp32 dK/dV of this rank's pieces that others read. Without documents under zigzag, rank
r receives every chunk of the ranks after it and the early chunk of the ranks before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from seqpar.cp.comm import Comm, Pending
from seqpar.cp.local import LocalOp
from seqpar.cp.merge import merge_two
from seqpar.cp.partition import Layout, Piece, cached_index


@dataclass(frozen=True)
class Pair:
    """A query piece of this rank meets a key piece: local query rows, and the key rows in the
    step's buffer (this rank's own buffer at step 0, the received pieces after)."""

    q_local: int
    q_len: int
    q_pos: int
    kv_off: int
    kv_len: int
    kv_pos: int


@dataclass(frozen=True)
class Step:
    src: int
    dst: int
    recv_rows: int                      # rows received from ``src`` (0: no receive posted)
    send_slots: Optional[tuple[int, ...]]  # local slots sent to ``dst`` (None: the whole buffer)
    send_rows: int                      # 0: no send posted
    pairs: tuple[Pair, ...]


def sees(qp: Piece, kp: Piece, causal: bool, window: int) -> bool:
    """Whether a query of piece ``qp`` can see a key of piece ``kp`` (same document; causal: some
    key starts before the queries end; ``window`` > 0: the last key lies inside the first query's
    window, ``qp.pos - kp_last < window``)."""
    return (qp.doc == kp.doc and (not causal or kp.pos < qp.end)
            and (not window or qp.pos - (kp.end - 1) < window))


def _first_row(pieces, kp: Piece, causal: bool, window: int) -> Optional[int]:
    """Row offset inside ``kp`` of the first key any of ``pieces`` reads (None: none reads it).
    Without a window every read piece is read whole; with one, only the halo from the earliest
    reader's window edge on."""
    firsts = [max(0, qp.pos - window + 1 - kp.pos) if window else 0
              for qp in pieces if sees(qp, kp, causal, window)]
    return min(firsts) if firsts else None


def needed(lay: Layout, receiver: int, src: int, causal: bool, window: int = 0) -> tuple[tuple[int, int], ...]:
    """``(index, first row)`` of each of ``src``'s pieces that ``receiver``'s queries read: rows
    ``first ..`` of the piece (same document; causal: the key piece starts before the receiver's
    last query of that document; a sliding window: only rows inside some query's window)."""
    def build() -> tuple[tuple[int, int], ...]:
        out = []
        for i, kp in enumerate(lay.pieces[src]):
            first = _first_row(lay.pieces[receiver], kp, causal, window)
            if first is not None:
                out.append((i, first))
        return tuple(out)
    return lay.cached(("ring_needed", receiver, src, causal, window), build)


def plan(lay: Layout, rank: int, causal: bool, window: int = 0) -> tuple[Step, ...]:
    """The ``world`` steps of ``rank`` (cached on the layout: built once per partition). With a
    sliding ``window`` a received piece is only its halo rows, and each pair's key range starts at
    its query piece's window edge (the kernel skips the tiles below that row by row)."""
    def build() -> tuple[Step, ...]:
        steps = []
        for i in range(lay.world):
            src, dst = (rank - i) % lay.world, (rank + i) % lay.world
            mine = lay.pieces[src]
            held: dict[int, tuple[int, int]] = {}  # piece -> (offset in the step's buffer, first row held)
            if i == 0:
                held = {j: (kp.local, 0) for j, kp in enumerate(mine)}
                recv_rows, send_slots, send_rows = 0, None, 0
            else:
                pos = 0
                for j, first in needed(lay, rank, src, causal, window):
                    held[j] = (pos, first)
                    pos += mine[j].length - first
                recv_mine = lay.pieces[rank]
                recv_rows = pos
                out = [s for j, first in needed(lay, dst, rank, causal, window)
                       for s in range(recv_mine[j].local + first, recv_mine[j].local + recv_mine[j].length)]
                send_rows = len(out)
                send_slots = None if out == list(range(lay.local_len)) else tuple(out)
            pairs = []
            for qp in lay.pieces[rank]:
                for j, (off, first) in held.items():
                    kp = mine[j]
                    if not sees(qp, kp, causal, window):
                        continue
                    start = kp.pos + first  # the first held key, moved up to the window's edge
                    if window:
                        start = max(start, qp.pos - window + 1)
                    pairs.append(Pair(qp.local, qp.length, qp.pos, off + start - kp.pos - first, kp.end - start,
                                      start))
            steps.append(Step(src, dst, recv_rows, send_slots, send_rows, tuple(pairs)))
        return tuple(steps)
    return lay.cached(("ring_plan", rank, causal, window), build)


def step_bytes(lay: Layout, rank: int, causal: bool, window: int = 0) -> tuple[list[int], list[int]]:
    """Rows ``rank`` receives per step (K/V pieces) and rows returned to it per step (its dK/dV)."""
    steps = plan(lay, rank, causal, window)
    return [s.recv_rows for s in steps[1:]], [s.send_rows for s in steps[1:]]


def _send_index(lay: Layout, rank: int, i: int, causal: bool, window: int,
                device: torch.device) -> Optional[torch.Tensor]:
    slots = plan(lay, rank, causal, window)[i].send_slots
    if slots is None:
        return None
    return cached_index(("ring_send", lay, rank, i, causal, window), device,
                        lambda: torch.tensor(slots, dtype=torch.int64))


def _post_kv(kv: torch.Tensor, comm: Comm, lay: Layout, i: int, causal: bool, window: int) -> Pending:
    st = plan(lay, comm.rank, causal, window)[i]
    send = None
    if st.send_rows:
        idx = _send_index(lay, comm.rank, i, causal, window, kv.device)
        send = kv if idx is None else kv.index_select(1, idx)
    shape = (kv.shape[0], st.recv_rows, *kv.shape[2:]) if st.recv_rows else None
    return comm.exchange(send, st.dst, shape, st.src, dtype=kv.dtype, device=kv.device)


def ring_forward(q, k, v, gates, comm: Comm, lay: Layout, op: LocalOp, causal: bool):
    window = op.window
    steps = plan(lay, comm.rank, causal, window)
    b, n, h, _ = q.shape
    d = k.shape[-1]
    out = torch.zeros((b, n, h, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), dtype=torch.float32, device=q.device)
    kv = torch.cat([k, v], dim=-1)
    pending: dict[int, Pending] = {}  # step -> its K/V transfer, posted one step ahead
    for i, st in enumerate(steps):
        buf = kv if i == 0 else pending.pop(i).wait()
        if i + 1 < comm.world:
            pending[i + 1] = _post_kv(kv, comm, lay, i + 1, causal, window)
        for pr in st.pairs:
            qs, ks = slice(pr.q_local, pr.q_local + pr.q_len), slice(pr.kv_off, pr.kv_off + pr.kv_len)
            o_b, l_b = op(q[:, qs], buf[:, ks, :, :d], buf[:, ks, :, d:], pr.q_pos, pr.kv_pos,
                          None if gates is None else gates[:, qs])
            out[:, qs], lse[:, :, qs] = merge_two(out[:, qs], lse[:, :, qs], o_b, l_b)
    return out, lse


def ring_backward(dout, q, k, v, gates, out, lse, comm: Comm, lay: Layout, op: LocalOp, causal: bool):
    window = op.window
    steps = plan(lay, comm.rank, causal, window)
    d = k.shape[-1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.cat([k, v], dim=-1)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    dout = dout.to(q.dtype)
    pending: dict[int, Pending] = {}  # step -> its K/V transfer, posted one step ahead
    ret: Optional[tuple[int, Pending]] = None  # the dK/dV return of the previous step, in flight

    def land(i: int, p: Pending) -> None:  # the dK/dV of this rank's pieces that rank + i used
        got = p.wait()
        if got is not None:
            idx = _send_index(lay, comm.rank, i, causal, window, kv.device)
            if idx is None:
                dkv.add_(got)
            else:
                dkv.index_add_(1, idx, got)

    for i, st in enumerate(steps):
        buf = kv if i == 0 else pending.pop(i).wait()
        if i + 1 < comm.world:
            pending[i + 1] = _post_kv(kv, comm, lay, i + 1, causal, window)
        # this step's dK/dV share, from the kernel's backward with the merged (out, lse): no recompute
        grad = dkv if i == 0 else (torch.zeros((kv.shape[0], st.recv_rows, *kv.shape[2:]), dtype=torch.float32,
                                               device=kv.device) if st.recv_rows else None)
        for pr in st.pairs:
            qs, ks = slice(pr.q_local, pr.q_local + pr.q_len), slice(pr.kv_off, pr.kv_off + pr.kv_len)
            gq, gk, gv = op.backward(q[:, qs], buf[:, ks, :, :d], buf[:, ks, :, d:], out[:, qs], lse[:, :, qs],
                                     dout[:, qs], pr.q_pos, pr.kv_pos, None if gates is None else gates[:, qs])
            dq[:, qs] += gq.float()
            grad[:, ks, :, :d] += gk.float()
            grad[:, ks, :, d:] += gv.float()
        # the previous step's return has had this step's compute to arrive; post this one at once
        if ret is not None:
            land(*ret)
            ret = None
        if i > 0 and (st.recv_rows or st.send_rows):
            shape = (kv.shape[0], st.send_rows, *kv.shape[2:]) if st.send_rows else None
            ret = (i, comm.exchange(grad, st.src, shape, st.dst, dtype=torch.float32, device=kv.device))
    if ret is not None:
        land(*ret)
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
    def forward(ctx, q, k, v, gates, comm, lay, op, causal):
        out, lse = ring_forward(q, k, v, gates, comm, lay, op, causal)
        ctx.save_for_backward(q, k, v, gates, out, lse)
        ctx.comm, ctx.lay, ctx.op, ctx.causal = comm, lay, op, causal
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gates, out, lse = ctx.saved_tensors
        dq, dk, dv, dg = ring_backward(dout, q, k, v, gates, out, lse, ctx.comm, ctx.lay, ctx.op, ctx.causal)
        return dq, dk, dv, dg, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, layout: Layout, op: LocalOp,
                   causal: bool = True, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local buffers ``q [b, L, H, d]``, ``k/v [b, L, H_kv, d]`` (gates ``[b, L, H]``) -> local output
    (0 in padding slots). ``layout``: the partition (USP passes the one its Ulysses groups merge to)."""
    return RingAttention.apply(q, k, v, gates, comm, layout, op, causal)
