"""LASP-2 for Lightning linear attention with exact decay (arXiv 2502.07563; docs/lightning.md).

Each local piece (two per document under zigzag) runs the per-rank kernel from a zero state, giving
its intra output and its local state ``M_j`` (one kernel call for all pieces, the pieces as
segments of its ``cu_seqlens``). One all-gather of the states other ranks read (fp32 ``[slots, b,
H, dk, dv]``: a piece is sent when a later piece of its document lives elsewhere; every piece when
final states are wanted) lets every rank form each piece's prefix: the states of the pieces of
*the same document* that end before it, wherever they live, decayed by the tokens between
(:func:`~seqpar.cp.merge.weighted_state_prefix`), so the state restarts at every document start
across ranks; the output correction ``o_t += λ^{t+1} q_t · prefix`` (t counted from the piece start)
completes it. Backward is the autograd adjoint: the kernel's state gradients, and one
reduce-scatter of the state gradients. Bytes per layer are ``(P-1) · slots · b · H · dk · dv · 4``,
independent of N (:func:`state_slots`: 2 under zigzag, 1 contiguous; with documents ``b = 1`` and
about 2 per document under zigzag, only the documents crossing a rank boundary when contiguous —
none when every document stays on one rank).
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.local import scatter_pieces
from seqpar.cp.merge import weighted_state_prefix
from seqpar.cp.partition import Layout, cached_index
from seqpar.kernels._common import seed_host_ints


def _correction(q: torch.Tensor, prefix: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``λ^{t+1} q_t · prefix`` for t = 0..len-1 of one piece: q ``[b, c, H, dk]``, prefix ``[b, H, dk, dv]``."""
    c = q.shape[1]
    steps = torch.arange(1, c + 1, device=q.device, dtype=torch.float32)
    decay = torch.exp(-slope.float()[None, :] * steps[:, None])  # [c, H], log space (slope is on q.device)
    return torch.einsum("bthk,bhkv->bthv", q.float(), prefix) * decay[None, :, :, None]


def _segments(lay: Layout, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Local ``cu_seqlens`` cutting the buffer into the rank's pieces (and padding runs between), and
    the segment of each piece: one kernel call runs every piece from a zero state."""
    def build():
        bounds, seg = [0], []
        for p in sorted(lay.pieces[rank], key=lambda p: p.local):
            if p.local > bounds[-1]:
                bounds.append(p.local)
            seg.append((p.local, len(bounds) - 1))
            bounds.append(p.local + p.length)
        if bounds[-1] < lay.local_len:
            bounds.append(lay.local_len)
        order = {local: s for local, s in seg}
        return tuple(bounds), tuple(order[p.local] for p in lay.pieces[rank])
    return lay.cached(("lasp2_segments", rank), build)


def exported(lay: Layout, finals: bool) -> tuple[tuple[int, ...], ...]:
    """Per rank, its pieces whose states another rank reads: a later piece of the same document lives
    elsewhere (every piece when every rank forms every document's final state). Documents that stay
    on one rank export nothing."""
    def build():
        out = []
        for r, ps in enumerate(lay.pieces):
            out.append(tuple(i for i, p in enumerate(ps) if finals or any(
                r2 != r and lay.pieces[r2][i2].pos >= p.end for r2, i2 in lay.doc_pieces[p.doc])))
        return tuple(out)
    return lay.cached(("lasp2_exported", finals), build)


def state_slots(lay: Layout, finals: bool) -> int:
    """States each rank contributes to the all-gather (the most any rank exports; 0: no all-gather)."""
    return max(len(e) for e in exported(lay, finals))


def _geometry(lay: Layout, rank: int, finals: bool):
    """Host plan of the prefixes: the documents to form, the row of each of their pieces' states in
    ``[gathered (P·slots) | this rank's own (pieces) | a zero state]``, distances to the targets (this
    rank's pieces, and with ``finals`` every document's end), and where each local piece and each
    document's final state sit among the targets."""
    def build():
        s, ex = state_slots(lay, finals), exported(lay, finals)
        where = {(r, i): r * s + m for r in range(lay.world) for m, i in enumerate(ex[r])}
        own = lay.world * s
        zero = own + len(lay.pieces[rank])
        mine: dict[int, list[int]] = {}
        for i, p in enumerate(lay.pieces[rank]):
            mine.setdefault(p.doc, []).append(i)
        docs = list(range(lay.num_docs)) if finals else sorted(mine)
        k = max((len(lay.doc_pieces[d]) for d in docs), default=1)
        t = max((len(mine.get(d, ())) + finals for d in docs), default=1)
        idx = torch.full((len(docs), k), zero, dtype=torch.int64)
        dist = torch.zeros(len(docs), t, k)
        valid = torch.zeros(len(docs), t, k, dtype=torch.bool)
        target = torch.zeros(len(docs), t)
        piece_at, final_at = [None] * len(lay.pieces[rank]), []
        for row, d in enumerate(docs):
            ends = []
            for j, (r, i) in enumerate(lay.doc_pieces[d]):
                idx[row, j] = own + i if r == rank else where.get((r, i), zero)
                ends.append(lay.pieces[r][i].end)
            targets = [(lay.pieces[rank][i].pos, i) for i in mine.get(d, ())]
            if finals:
                targets.append((lay.doc_real[d], None))
            for ti, (pos, i) in enumerate(targets):
                target[row, ti] = pos
                for j, e in enumerate(ends):
                    if e <= pos:
                        dist[row, ti, j], valid[row, ti, j] = pos - e, True
                if i is None:
                    final_at.append(row * t + ti)
                else:
                    piece_at[i] = row * t + ti
        tensors = (torch.tensor(docs, dtype=torch.int64), idx.reshape(-1), dist, valid, target,
                   torch.tensor(final_at, dtype=torch.int64), torch.tensor(ex[rank], dtype=torch.int64))
        return tensors, tuple(piece_at)
    return lay.cached(("lasp2_geometry", rank, finals), build)


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    layout: Layout, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    varlen: bool = False, backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local buffers ``q [b, L, H, dk]``, ``k [b, L, H_kv, dk]``, ``v [b, L, H_kv, dv]`` -> (local output,
    0 in padding slots; final state, replicated, or None).

    ``varlen`` (documents given, batch 1): states are per document, ``initial_state`` / final
    ``[num_docs, H, dk, dv]``; otherwise per batch row ``[b, H, dk, dv]`` (one document).
    """
    from seqpar.kernels import lightning_attention

    lay, rank = layout, comm.rank
    slope = slope.detach()  # the kernel treats slopes as constants; keep the prefix consistent
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    pieces = lay.pieces[rank]
    # intra pass: every piece from a zero state; its output and its local state M
    if b == 1 and not (len(pieces) == 1 and lay.dense(rank)):
        bounds, seg = _segments(lay, rank)
        cu = cached_index(("lasp2_cu", lay, rank), q.device, lambda: torch.tensor(bounds, dtype=torch.int32))
        o_all, m_all = lightning_attention(q, k, v, slope, output_final_state=True, backend=backend,
                                           cu_seqlens=seed_host_ints(cu, bounds))
        intra = [o_all[:, p.local:p.local + p.length] for p in pieces]
        states = [m_all[j:j + 1] for j in seg]
    else:
        intra, states = [], []
        for p in pieces:
            o, m = lightning_attention(q[:, p.local:p.local + p.length], k[:, p.local:p.local + p.length],
                                       v[:, p.local:p.local + p.length], slope, output_final_state=True,
                                       backend=backend)
            intra.append(o)
            states.append(m)
    host, piece_at = _geometry(lay, rank, output_final_state)
    docs, idx, dist, valid, target, final_at, ex = cached_index(
        ("lasp2_geometry", lay, rank, output_final_state), q.device, lambda: host)
    own = torch.stack(states) if states else q.new_zeros((0, b, h, dk, dv), dtype=torch.float32)
    slots = state_slots(lay, output_final_state)
    gathered = own[:0]
    if slots:  # one all-gather of the states other ranks read (fp32 [P * slots, b, H, dk, dv])
        send = own.index_select(0, ex)
        send = torch.cat([send, send.new_zeros((slots - send.shape[0], *send.shape[1:]))])
        gathered = all_gather_autograd(send, comm, dim=0)
    outs, acc = [], None
    if host[0].numel():  # the documents this rank forms prefixes (or final states) of
        source = torch.cat([gathered, own, own.new_zeros((1, *own.shape[1:]))])
        by_doc = source.index_select(0, idx).view(host[0].numel(), -1, *own.shape[1:])
        init = None
        if initial_state is not None:  # [D, b, H, dk, dv]: per document, or the batch rows of the one sequence
            init = (initial_state[:, None] if varlen else initial_state[None]).index_select(0, docs)
        acc = weighted_state_prefix(by_doc, dist, valid, target, slope, init)  # [D, T, b, H, dk, dv]
        acc = acc.reshape(-1, *acc.shape[2:])
    for j, p in enumerate(pieces):
        prefix = acc[piece_at[j]]
        outs.append((intra[j].float() + _correction(q[:, p.local:p.local + p.length], prefix, slope)).to(q.dtype))
    out = scatter_pieces(outs, lay, rank, tail=(h, dv), ties=(q, gathered) if slots else (q,))
    if not output_final_state:
        return out, None
    final = acc.index_select(0, final_at)  # [D, b, H, dk, dv] (output_final_state: every document formed)
    return out, (final[:, 0] if varlen else final[0])
