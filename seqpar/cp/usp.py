"""USP: 2-D context parallelism, Ulysses inside groups of ``ulysses_degree`` ranks and ring across
them (arXiv 2405.07719; docs/cp.md), built from one CP group.

Group rank ``r = i·U + u``: Ulysses group ``i`` holds ranks ``i·U .. i·U+U-1``, ring group ``u`` the
ranks with the same ``u``. The all-to-all turns the ``U`` members' sequence shards into head
shards (``H/U`` heads, the union of their buffers, member-major: the partition's
:meth:`~seqpar.cp.partition.Layout.merged` layout); the ring then runs over the ``P/U`` Ulysses
groups with those merged pieces (documents, padding and zigzag balance carry over: each merged
buffer is a union of members' pieces); the output all-to-all goes back. Backward is the adjoint
of each stage.

Lightning: the ring dimension is LASP-2 over the ring group (one all-gather of piece states,
decay-aware prefixes per document over the merged pieces), with the slopes (and initial state) of
the member's global heads; the final state is all-gathered over the heads of the Ulysses group.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.cp.comm import Comm, all_gather_autograd, heads_to_seq, seq_to_heads
from seqpar.cp.lasp2 import lasp2_attention
from seqpar.cp.local import LocalOp
from seqpar.cp.partition import Layout
from seqpar.cp.ring import ring_attention
from seqpar.cp.s2_heads import HeadPlacement, permute_heads


def _replicate_kv(k: torch.Tensor, v: torch.Tensor, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    hkv = k.shape[2]
    if hkv < u:  # replicate kv heads so every Ulysses member owns a whole kv head
        return k.repeat_interleave(u // hkv, dim=2), v.repeat_interleave(u // hkv, dim=2)
    return k, v


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, layout: Layout, op: LocalOp,
                  ulysses_degree: int, causal: bool = True, gates: Optional[torch.Tensor] = None,
                  placement: Optional[HeadPlacement] = None) -> torch.Tensor:
    """Local buffers in (``[b, L, H, d]``), local output out (0 in padding slots). ``placement``
    (s2): the kv heads of each Ulysses member (``op`` runs the member's runs of global heads)."""
    u = ulysses_degree
    uc, rc = comm.split_2d(u)
    inv = None
    if placement is not None and not placement.identity:  # heads in the placement's order, member-major
        qi, ki, inv = placement.indices(q.device)
        q, k, v = permute_heads(q, qi), permute_heads(k, ki), permute_heads(v, ki)
    k, v = _replicate_kv(k, v, u)
    qh, kh, vh = (seq_to_heads(t, uc) for t in (q, k, v))
    gh = None if gates is None else seq_to_heads(gates.unsqueeze(-1), uc).squeeze(-1)
    o = heads_to_seq(ring_attention(qh, kh, vh, rc, layout=layout.merged(u), op=op, causal=causal, gates=gh), uc)
    return o if inv is None else permute_heads(o, inv)


def usp_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, comm: Comm, *,
                            layout: Layout, ulysses_degree: int, initial_state: Optional[torch.Tensor] = None,
                            output_final_state: bool = False, varlen: bool = False,
                            backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Lightning under USP: Ulysses all-to-all, LASP-2 over the ring group, all-to-all back."""
    u = ulysses_degree
    uc, rc = comm.split_2d(u)
    k, v = _replicate_kv(k, v, u)
    qh, kh, vh = (seq_to_heads(t, uc) for t in (q, k, v))
    hl = q.shape[2] // u
    heads = slice(uc.rank * hl, (uc.rank + 1) * hl)  # this member's global heads
    o, final = lasp2_attention(qh, kh, vh, slope[heads], rc, layout=layout.merged(u),
                               initial_state=None if initial_state is None else initial_state[:, heads],
                               output_final_state=output_final_state, varlen=varlen, backend=backend)
    if final is not None:
        final = all_gather_autograd(final.transpose(0, 1), uc, dim=0).transpose(0, 1)  # heads in order
    return heads_to_seq(o, uc), final
