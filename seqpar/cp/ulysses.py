"""DeepSpeed-Ulysses context parallelism: all-to-all from sequence shards to head shards and back.

Forward: one all-to-all each for q, k, v (and MoH gates), the local op on the *full* sequence with
``H / P`` heads (global head indices ``rank·H/P ...``: Lightning slopes and MoH gates follow the
heads), one all-to-all of the output back. Backward is the adjoint (the same all-to-alls in
reverse). The gathered slots are put in the real order (documents in order, padding dropped) and
the local op runs with the documents' ``cu_seqlens``, so every kernel's varlen path applies (S2's
layout restarts per document, Lightning's state per document, MoH's gates travel with their
tokens); padding slots get output 0. GQA: when ``P > H_kv`` the kv heads are replicated
``P / H_kv`` times before the exchange so every rank holds the kv head its query heads read
(gradients of replicas are summed). S2 patterns follow the *global* kv head index
(:func:`kv_head_offset`), so a rank's heads compute exactly their blocks of the full layout; an S2
head placement (:mod:`seqpar.cp.s2_heads`) reorders the heads before the all-to-all so each rank
gets kv heads of complementary stride residues (and equal block counts), and restores the order
of the output after it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from seqpar.cp.allgather import from_real_order, real_order
from seqpar.cp.comm import Comm, all_gather_autograd, heads_to_seq, seq_to_heads
from seqpar.cp.partition import Layout, cached_index
from seqpar.cp.s2_heads import HeadPlacement, permute_heads, s2_runs_forward
from seqpar.kernels._common import seed_host_ints


def kv_head_offset(member: int, degree: int, num_kv_heads: int) -> int:
    """Global index of the first kv head that Ulysses member ``member`` of ``degree`` holds after
    the all-to-all (kv heads replicated ``degree / num_kv_heads`` times when fewer than ``degree``)."""
    hk = max(num_kv_heads, degree)
    return member * (hk // degree) // (hk // num_kv_heads)


def doc_cu_seqlens(lay: Layout, device: torch.device) -> Optional[torch.Tensor]:
    """int32 ``cu_seqlens`` of the documents in the real order (None for a single document)."""
    if lay.num_docs == 1:
        return None
    cu = cached_index(("doc_cu", lay), device, lambda: torch.tensor(lay.doc_start, dtype=torch.int32))
    return seed_host_ints(cu, lay.doc_start)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, kind: str,
                      layout: Layout, kw: dict[str, Any], placement: Optional[HeadPlacement] = None):
    """Local buffers in, local buffer out. Returns ``o`` (lightning: ``(o, final_state | None)``).
    ``placement`` (s2): the kv heads of each rank (None or identity: contiguous)."""
    from seqpar import kernels

    p, h, hkv = comm.world, q.shape[2], k.shape[2]
    lay = layout
    inv = None
    if placement is not None and not placement.identity:  # heads in the placement's order, member-major
        qi, ki, inv = placement.indices(q.device)
        q, k, v = permute_heads(q, qi), permute_heads(k, ki), permute_heads(v, ki)
    if hkv < p:  # replicate kv heads so that each rank owns one whole kv head
        k, v = k.repeat_interleave(p // hkv, dim=2), v.repeat_interleave(p // hkv, dim=2)
    qh, kh, vh = (real_order(seq_to_heads(t, comm), lay) for t in (q, k, v))
    cu = doc_cu_seqlens(lay, q.device)
    heads = slice(comm.rank * (h // p), (comm.rank + 1) * (h // p))
    backend = kw.get("backend", "auto")
    if kind == "softmax":
        o = kernels.flash_attention(qh, kh, vh, causal=kw.get("causal", True), sm_scale=kw.get("sm_scale"),
                                    cu_seqlens=cu, window=kw.get("window"), backend=backend)
    elif kind == "s2":
        off = int(kw.get("kv_head_offset", 0))  # tensor parallelism: local kv heads start at global `off`
        runs = (placement.runs(comm.rank, off) if placement is not None
                else ((0, off + kv_head_offset(comm.rank, p, hkv), kh.shape[2]),))
        o = s2_runs_forward(qh, kh, vh, runs, kw.get("total_kv_heads") or off + hkv, layout=kw["layout"],
                            sm_scale=kw.get("sm_scale"), backend=backend, cu_seqlens=cu)
    elif kind == "moh":
        g = real_order(seq_to_heads(kw["gates"].unsqueeze(-1), comm), lay).squeeze(-1)
        o = kernels.moh_attention(qh, kh, vh, g, causal=kw.get("causal", True), sm_scale=kw.get("sm_scale"),
                                  cu_seqlens=cu, backend=backend)
    elif kind == "lightning":
        init = kw.get("initial_state")
        o, final = kernels.lightning_attention(
            qh, kh, vh, kw["slope"][heads], initial_state=None if init is None else init[:, heads],
            output_final_state=bool(kw.get("output_final_state", False)), cu_seqlens=cu, backend=backend)
        out = heads_to_seq(from_real_order(o, lay), comm)
        if final is not None:
            final = all_gather_autograd(final.transpose(0, 1), comm, dim=0).transpose(0, 1)  # heads in order
        return out, final
    else:
        raise ValueError(f"ulysses does not support kind {kind!r}")
    o = heads_to_seq(from_real_order(o, lay), comm)
    return o if inv is None else permute_heads(o, inv)
