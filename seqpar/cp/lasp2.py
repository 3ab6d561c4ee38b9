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
from seqpar.cp.partition import chunk_ids


def _correction(q: torch.Tensor, prefix: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``λ^{t+1} q_t · prefix`` for t = 0..len-1 of one piece: q ``[b, c, H, dk]``, prefix ``[b, H, dk, dv]``."""
    c = q.shape[1]
    steps = torch.arange(1, c + 1, device=q.device, dtype=torch.float32)
    decay = torch.exp(-slope.float().to(q.device)[None, :] * steps[:, None])  # [c, H], log space
    return torch.einsum("bthk,bhkv->bthv", q.float(), prefix) * decay[None, :, :, None]


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    balance: str, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                    chunks: Optional[Callable[[int], Sequence[int]]] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local shards ``q [b, s_loc, H, dk]``, ``k [b, s_loc, H_kv, dk]``, ``v [b, s_loc, H_kv, dv]``.

    ``chunks(r)``: the global chunk ids group rank ``r`` holds, in local order (default: its
    ``balance`` chunks; USP passes the union of a Ulysses group's chunks). All chunks are equal.

    With ``cu_seqlens`` (global; THD per-document zigzag shards, batch 1) every document has its
    own 2P chunks, prefixes and final state (``initial_state`` / final ``[num_docs, H, dk, dv]``).
    """
    slope = slope.detach()  # the kernel treats slopes as constants; keep the prefix consistent
    if cu_seqlens is not None:
        return _lasp2_varlen(q, k, v, slope, comm, initial_state, output_final_state, cu_seqlens, backend)
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
    order = [cid for r in range(comm.world) for cid in chunks(r)]
    by_chunk = gathered.index_select(0, torch.argsort(torch.tensor(order)).to(gathered.device))
    prefix, final = decayed_state_prefix(by_chunk, [c] * len(order), slope, initial_state)
    outs = [(intra[j].float() + _correction(q[:, j * c:(j + 1) * c], prefix[cid], slope)).to(q.dtype)
            for j, cid in enumerate(ids)]
    return torch.cat(outs, dim=1), (final if output_final_state else None)


def _lasp2_varlen(q, k, v, slope, comm: Comm, initial_state, output_final_state: bool, cu_seqlens: torch.Tensor,
                  backend: str):
    from seqpar.kernels import lightning_attention

    p, rank = comm.world, comm.rank
    bounds = cu_seqlens.detach().cpu().tolist()
    piece_len = [(e - s) // (2 * p) for s, e in zip(bounds[:-1], bounds[1:])]
    docs = len(piece_len)
    # every local piece (two per document) is its own segment for the intra pass
    local_cu = torch.tensor([0] + torch.tensor([c for c in piece_len for _ in range(2)]).cumsum(0).tolist(),
                            dtype=torch.int32, device=q.device)
    intra, states = lightning_attention(q, k, v, slope, output_final_state=True, cu_seqlens=local_cu,
                                        backend=backend)  # states [2 * docs, H, dk, dv]
    gathered = all_gather_autograd(states, comm, dim=0)  # [P * 2 * docs, ...]: rank, doc, (r, 2P-1-r)
    outs, finals = [], []
    for i, c in enumerate(piece_len):
        idx = [(cid if cid < p else 2 * p - 1 - cid) * 2 * docs + 2 * i + (0 if cid < p else 1)
               for cid in range(2 * p)]
        by_chunk = gathered.index_select(0, torch.tensor(idx, device=gathered.device)).unsqueeze(1)
        init = None if initial_state is None else initial_state[i:i + 1]
        prefix, final = decayed_state_prefix(by_chunk, [c] * (2 * p), slope, init)
        finals.append(final[0])
        for j, cid in enumerate(chunk_ids(rank, p, "zigzag")):
            lo = int(local_cu[2 * i + j])
            outs.append((intra[:, lo:lo + c].float() + _correction(q[:, lo:lo + c], prefix[cid], slope)).to(q.dtype))
    return torch.cat(outs, dim=1), (torch.stack(finals) if output_final_state else None)
