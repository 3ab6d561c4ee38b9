"""All-gather context parallelism (Llama 3 style) for softmax, s2 and moh.

Forward: one all-gather of K and V (packed into one tensor), restored to sequence order; each local
query chunk attends, with its absolute offset, to the keys up to its own end (causal) or all keys.
Backward: the all-gather's adjoint, one reduce-scatter of dK/dV; dQ stays local. Cost per layer
(``N`` global tokens, ``b`` bytes per element): ``(P-1)/P · N · H_kv · (d + dv) · b`` received in
forward (1 call) and the same in backward (1 call).
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd
from seqpar.cp.local import LocalOp
from seqpar.cp.partition import chunk_ids, token_index


def gather_sequence(x: torch.Tensor, comm: Comm, balance: str) -> torch.Tensor:
    """All-gather a sharded ``[b, s_loc, ...]`` tensor and restore global sequence order."""
    g = all_gather_autograd(x, comm, dim=1)
    n = g.shape[1]
    gidx = torch.cat([token_index(r, comm.world, n, balance) for r in range(comm.world)])
    if balance == "contiguous":
        return g  # rank-major already is sequence order
    return g.index_select(1, torch.argsort(gidx).to(g.device))


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str,
                        op: LocalOp, causal: bool = True, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local shards ``q [b, s_loc, H, d]``, ``k/v [b, s_loc, H_kv, d]`` -> local output (autograd-exact)."""
    d = k.shape[-1]
    kv = gather_sequence(torch.cat([k, v], dim=-1), comm, balance)
    k_full, v_full = kv[..., :d], kv[..., d:]
    ids = chunk_ids(comm.rank, comm.world, balance)
    c = q.shape[1] // len(ids)
    outs = []
    for j, cid in enumerate(ids):
        qs = slice(j * c, (j + 1) * c)
        end = (cid + 1) * c if causal else k_full.shape[1]  # causal: later keys are all masked
        o, _ = op(q[:, qs], k_full[:, :end], v_full[:, :end], cid * c, 0,
                  None if gates is None else gates[:, qs])
        outs.append(o)
    return torch.cat(outs, dim=1)
