"""LASP-2 for Lightning linear attention with exact decay (arXiv 2502.07563; docs/lightning.md).

Each local chunk (two under zigzag) runs the per-rank kernel from a zero state, giving its intra
output and its local state ``M_j``. One all-gather of the states (fp32 ``[chunks, b, H, dk, dv]``)
lets every rank form each chunk's prefix with :func:`~seqpar.cp.merge.decayed_state_prefix`
(a chunk's prefix is every chunk before it in *sequence order*, wherever it lives), and the output
correction ``o_t += λ^{t+1} q_t · prefix`` (t counted from the chunk start) completes it.
Backward is the autograd adjoint: the kernel's state gradients, and one reduce-scatter of the state
gradients. Bytes per layer are ``(P-1) · chunks_per_rank · b · H · dk · dv · 4``, independent of N.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.merge import decayed_state_prefix
from seqpar.cp.partition import cached_index, chunk_ids
from seqpar.kernels._common import host_ints, seed_host_ints


def _correction(q: torch.Tensor, prefix: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``λ^{t+1} q_t · prefix`` for t = 0..len-1 of one piece: q ``[b, c, H, dk]``, prefix ``[b, H, dk, dv]``."""
    c = q.shape[1]
    steps = torch.arange(1, c + 1, device=q.device, dtype=torch.float32)
    decay = torch.exp(-slope.float()[None, :] * steps[:, None])  # [c, H], log space (slope is on q.device)
    return torch.einsum("bthk,bhkv->bthv", q.float(), prefix) * decay[None, :, :, None]


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    balance: str, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                    chunks: Optional[Callable[[int], Sequence[int]]] = None,
                    cu_seqlens_unpadded: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local shards ``q [b, s_loc, H, dk]``, ``k [b, s_loc, H_kv, dk]``, ``v [b, s_loc, H_kv, dv]``.

    ``chunks(r)``: the global chunk ids group rank ``r`` holds, in local order (default: its
    ``balance`` chunks; USP passes the union of a Ulysses group's chunks). All chunks are equal.

    With ``cu_seqlens`` (global; THD per-document zigzag shards, batch 1) every document has its
    own 2P chunks, prefixes and final state (``initial_state`` / final ``[num_docs, H, dk, dv]``).
    ``cu_seqlens_unpadded`` (the real boundaries before ``cp.pad_varlen``): each chunk's state is
    taken at its last real token and the prefixes count real tokens only, so the final state is the
    state after each document's last real token (exact gradients); pad outputs are 0.
    """
    slope = slope.detach()  # the kernel treats slopes as constants; keep the prefix consistent
    if cu_seqlens is not None:
        return _lasp2_varlen(q, k, v, slope, comm, initial_state, output_final_state, cu_seqlens, backend,
                             cu_seqlens_unpadded)
    from seqpar.kernels import lightning_attention

    if chunks is None:
        def chunks(r: int) -> Sequence[int]:
            return chunk_ids(r, comm.world, balance)
    ids = chunks(comm.rank)
    c = q.shape[1] // len(ids)
    intra, states = [], []
    for j in range(len(ids)):
        s = slice(j * c, (j + 1) * c)
        o, m = lightning_attention(q[:, s], k[:, s], v[:, s], slope, output_final_state=True, backend=backend)
        intra.append(o)
        states.append(m)
    gathered = all_gather_autograd(torch.stack(states), comm, dim=0)  # [P * len(ids), b, H, dk, dv]
    order = tuple(cid for r in range(comm.world) for cid in chunks(r))
    to_chunk = cached_index(("lasp2_order", order), gathered.device, lambda: torch.argsort(torch.tensor(order)))
    by_chunk = gathered.index_select(0, to_chunk)
    prefix, final = decayed_state_prefix(by_chunk, [c] * len(order), slope, initial_state)
    outs = [(intra[j].float() + _correction(q[:, j * c:(j + 1) * c], prefix[cid], slope)).to(q.dtype)
            for j, cid in enumerate(ids)]
    return torch.cat(outs, dim=1), (final if output_final_state else None)


def _lasp2_varlen(q, k, v, slope, comm: Comm, initial_state, output_final_state: bool, cu_seqlens: torch.Tensor,
                  backend: str, cu_seqlens_unpadded: Optional[torch.Tensor] = None):
    from seqpar.kernels import lightning_attention

    p, rank = comm.world, comm.rank
    bounds = host_ints(cu_seqlens)  # cached host copy: no sync per layer
    piece_len = [(e - s) // (2 * p) for s, e in zip(bounds[:-1], bounds[1:])]
    docs = len(piece_len)
    ids = chunk_ids(rank, p, "zigzag")
    # real tokens of every chunk of every document (all of them without padding information)
    if cu_seqlens_unpadded is None:
        real = [[c] * (2 * p) for c in piece_len]
    else:
        rb = host_ints(cu_seqlens_unpadded)
        real = [[min(max(rb[i + 1] - rb[i] - cid * c, 0), c) for cid in range(2 * p)] for i, c in enumerate(piece_len)]
    # every local piece (two per document) is its own segment for the intra pass
    starts, real_ends = [0], [0]  # padded piece bounds; the same pieces' real bounds (cumulative)
    for i, c in enumerate(piece_len):
        for cid in ids:
            real_ends.append(real_ends[-1] + real[i][cid])
            starts.append(starts[-1] + c)
    local_cu = cached_index(("lasp2_local_cu", tuple(starts)), q.device,
                            lambda: torch.tensor(starts, dtype=torch.int32))
    seed_host_ints(local_cu, starts)
    kw = {}
    if cu_seqlens_unpadded is not None:  # piece states at their last real token, pad outputs 0
        local_real = cached_index(("lasp2_local_real", tuple(real_ends)), q.device,
                                  lambda: torch.tensor(real_ends, dtype=torch.int32))
        kw["cu_seqlens_unpadded"] = seed_host_ints(local_real, real_ends)
    # gathered row of (document i, chunk cid): rank-major, per rank (doc, its two pieces)
    idx_all = cached_index(("lasp2_varlen_idx", p, docs), q.device, lambda: torch.tensor(
        [[(cid if cid < p else 2 * p - 1 - cid) * 2 * docs + 2 * i + (0 if cid < p else 1) for cid in range(2 * p)]
         for i in range(docs)]))
    intra, states = lightning_attention(q, k, v, slope, output_final_state=True, cu_seqlens=local_cu,
                                        backend=backend, **kw)  # states [2 * docs, H, dk, dv]
    gathered = all_gather_autograd(states, comm, dim=0)  # [P * 2 * docs, ...]: rank, doc, (r, 2P-1-r)
    outs, finals = [], []
    for i, c in enumerate(piece_len):
        by_chunk = gathered.index_select(0, idx_all[i]).unsqueeze(1)
        init = None if initial_state is None else initial_state[i:i + 1]
        # real lengths: a chunk's state sits at its last real token; chunks after the document's
        # last real token are empty (their pad outputs are masked below)
        prefix, final = decayed_state_prefix(by_chunk, real[i], slope, init)
        finals.append(final[0])
        for j, cid in enumerate(ids):
            lo = starts[2 * i + j]
            o = intra[:, lo:lo + c].float() + _correction(q[:, lo:lo + c], prefix[cid], slope)
            if real[i][cid] < c:
                o = torch.cat([o[:, :real[i][cid]], o.new_zeros((o.shape[0], c - real[i][cid], *o.shape[2:]))], 1)
            outs.append(o.to(q.dtype))
    return torch.cat(outs, dim=1), (torch.stack(finals) if output_final_state else None)
