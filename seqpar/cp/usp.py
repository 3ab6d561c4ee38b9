"""USP: 2-D context parallelism, Ulysses inside groups of ``ulysses_degree`` ranks and ring across
them (PAPERS.md, arXiv 2405.07719), built from one CP group.

Group rank ``r = i·U + u``: Ulysses group ``i`` holds ranks ``i·U .. i·U+U-1``, ring group ``u`` the
ranks with the same ``u``. The all-to-all turns the ``U`` members' sequence shards into head
shards (``H/U`` heads, the union of their chunks); the ring then runs over the ``P/U`` Ulysses
groups with those chunk sets (zigzag balance is preserved: each set is a union of zigzag pairs);
the output all-to-all goes back. Backward is the adjoint of each stage.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seqpar.cp.comm import Comm, heads_to_seq, seq_to_heads
from seqpar.cp.local import LocalOp
from seqpar.cp.partition import chunk_ids
from seqpar.cp.ring import ring_attention


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, balance: str, op: LocalOp,
                  ulysses_degree: int, causal: bool = True, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local shards in (``[b, s_loc, H, d]``), local output out."""
    u, p = ulysses_degree, comm.world
    uc, rc = comm.split_2d(u)
    hkv = k.shape[2]
    if hkv < u:  # replicate kv heads so every Ulysses member owns a whole kv head
        k, v = k.repeat_interleave(u // hkv, dim=2), v.repeat_interleave(u // hkv, dim=2)
    qh, kh, vh = (seq_to_heads(t, uc) for t in (q, k, v))
    gh = None if gates is None else seq_to_heads(gates.unsqueeze(-1), uc).squeeze(-1)

    def chunks(i: int) -> Sequence[int]:
        return [cid for m in range(u) for cid in chunk_ids(i * u + m, p, balance)]

    o = ring_attention(qh, kh, vh, rc, balance=balance, op=op, causal=causal, gates=gh, chunks=chunks)
    return heads_to_seq(o, uc)
