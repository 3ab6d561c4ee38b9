"""LASP-2 for Lightning linear attention with exact decay (PAPERS.md "LASP-2").

Each local chunk (two under zigzag) runs the per-rank kernel from a zero state, giving its intra
output and its local state ``M_j``. One all-gather of the states (fp32 ``[chunks, b, H, dk, dv]``)
lets every rank form each chunk's prefix with :func:`~seqpar.cp.merge.decayed_state_prefix`
(a chunk's prefix is every chunk before it in *sequence order*, wherever it lives), and the output
correction ``o_t += λ^{t+1} q_t · prefix`` (t counted from the chunk start) completes it.
Backward is the autograd adjoint: the kernel's state gradients, and one reduce-scatter of the state
gradients. Bytes per layer are ``(P-1) · chunks_per_rank · b · H · dk · dv · 4``, independent of N.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.merge import decayed_state_prefix
from seqpar.cp.partition import chunk_ids, num_chunks


def lasp2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                    balance: str, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                    backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local shards ``q [b, s_loc, H, dk]``, ``k [b, s_loc, H_kv, dk]``, ``v [b, s_loc, H_kv, dv]``."""
    from seqpar.kernels import lightning_attention

    ids = chunk_ids(comm.rank, comm.world, balance)
    c = q.shape[1] // len(ids)
    slope = slope.detach()  # the kernel treats slopes as constants; keep the prefix consistent
    intra, states = [], []
    for j in range(len(ids)):
        s = slice(j * c, (j + 1) * c)
        o, m = lightning_attention(q[:, s], k[:, s], v[:, s], slope, output_final_state=True, backend=backend)
        intra.append(o)
        states.append(m)
    gathered = all_gather_autograd(torch.stack(states), comm, dim=0)  # [P * len(ids), b, H, dk, dv]
    order = [cid for r in range(comm.world) for cid in chunk_ids(r, comm.world, balance)]
    by_chunk = gathered.index_select(0, torch.argsort(torch.tensor(order)).to(gathered.device))
    prefix, final = decayed_state_prefix(by_chunk, [c] * num_chunks(comm.world, balance), slope, initial_state)
    lam_log = -slope.float().to(q.device)  # log λ per head
    decay = torch.exp(lam_log[None, :] * torch.arange(1, c + 1, device=q.device, dtype=torch.float32)[:, None])  # [c, H]
    outs = []
    for j, cid in enumerate(ids):
        qs = q[:, j * c:(j + 1) * c].float()
        corr = torch.einsum("bthk,bhkv->bthv", qs, prefix[cid]) * decay[None, :, :, None]
        outs.append((intra[j].float() + corr).to(q.dtype))
    return torch.cat(outs, dim=1), (final if output_final_state else None)
