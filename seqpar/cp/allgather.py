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
from seqpar.cp.partition import cached_index, chunk_ids, token_index, varlen_token_index
from seqpar.kernels._common import host_ints


def arrival_index(comm: Comm, n: int, balance: str, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global positions of a rank-major gather of every rank's shard (THD order with ``cu_seqlens``)."""
    if cu_seqlens is not None:
        return torch.cat([varlen_token_index(cu_seqlens, r, comm.world)[0] for r in range(comm.world)])
    return torch.cat([token_index(r, comm.world, n, balance) for r in range(comm.world)])


def sequence_orders(comm: Comm, n: int, balance: str, cu_seqlens: Optional[torch.Tensor],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_seq, to_rank)`` on ``device``: rank-major arrival order -> sequence order and back
    (built once per shape / document layout and cached)."""
    cu = None if cu_seqlens is None else host_ints(cu_seqlens)

    def build():
        gidx = arrival_index(comm, n, balance, cu_seqlens)
        return torch.argsort(gidx), gidx
    return cached_index(("orders", comm.world, n, balance, cu), device, build)


def gather_sequence(x: torch.Tensor, comm: Comm, balance: str, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All-gather a sharded ``[b, s_loc, ...]`` tensor and restore global sequence order."""
    g = all_gather_autograd(x, comm, dim=1)
    if balance == "contiguous" and cu_seqlens is None:
        return g  # rank-major already is sequence order
    return g.index_select(1, sequence_orders(comm, g.shape[1], balance, cu_seqlens, g.device)[0])


def _pieces(comm: Comm, q_len: int, balance: str, cu_seqlens: Optional[torch.Tensor]):
    """(local start, length, absolute position in its document, document start) of each local q piece."""
    if cu_seqlens is None:
        ids = chunk_ids(comm.rank, comm.world, balance)
        c = q_len // len(ids)
        return [(j * c, c, cid * c, 0) for j, cid in enumerate(ids)]
    out, local = [], 0
    bounds = host_ints(cu_seqlens)  # cached host copy: no sync per layer
    for start, end in zip(bounds[:-1], bounds[1:]):
        c = (end - start) // (2 * comm.world)
        for cid in chunk_ids(comm.rank, comm.world, "zigzag"):
            out.append((local, c, cid * c, start))
            local += c
    return out


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str,
                        op: LocalOp, causal: bool = True, gates: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local shards ``q [b, s_loc, H, d]``, ``k/v [b, s_loc, H_kv, d]`` -> local output (autograd-exact).

    With ``cu_seqlens`` (global, THD per-document zigzag shards) each local piece attends only to
    its own document's keys, at its position inside the document.
    """
    d = k.shape[-1]
    kv = gather_sequence(torch.cat([k, v], dim=-1), comm, balance, cu_seqlens)
    k_full, v_full = kv[..., :d], kv[..., d:]
    bounds = None if cu_seqlens is None else list(host_ints(cu_seqlens))
    outs = []
    for lo, c, pos, doc_start in _pieces(comm, q.shape[1], balance, cu_seqlens):
        if causal:  # later keys are all masked
            k_end = doc_start + pos + c
        else:
            k_end = k_full.shape[1] if bounds is None else bounds[bounds.index(doc_start) + 1]
        o, _ = op(q[:, lo:lo + c], k_full[:, doc_start:k_end], v_full[:, doc_start:k_end], pos, 0,
                  None if gates is None else gates[:, lo:lo + c])
        outs.append(o)
    return torch.cat(outs, dim=1)
