"""The per-rank softmax-family op each CP strategy calls: one signature for softmax, s2 and moh.

``op(q, k, v, q_offset, k_offset, gates) -> (o, lse)`` with absolute token positions, so a
strategy only decides *which* keys a query chunk meets and where they sit in the sequence.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

LocalOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, Optional[torch.Tensor]],
                   tuple[torch.Tensor, torch.Tensor]]


def softmax_family_op(kind: str, kw: dict[str, Any], kv_head_offset: int = 0,
                      total_kv_heads: Optional[int] = None) -> LocalOp:
    """Bind ``kind`` ("softmax" | "s2" | "moh") and its keyword arguments to a local op.

    ``kv_head_offset`` / ``total_kv_heads``: the local kv heads are a slice of the global ones
    (USP after its all-to-all); S2 patterns follow the global index.
    """
    from seqpar import kernels

    common = {"sm_scale": kw.get("sm_scale"), "backend": kw.get("backend", "auto")}
    if kind == "softmax":
        def op(q, k, v, q_off, k_off, gates):
            return kernels.flash_attention(q, k, v, causal=kw.get("causal", True), return_lse=True,
                                           q_offset=q_off, k_offset=k_off, **common)
    elif kind == "s2":
        def op(q, k, v, q_off, k_off, gates):
            return kernels.s2_attention(q, k, v, kw["layout"], return_lse=True, q_offset=q_off,
                                        k_offset=k_off, kv_head_offset=kv_head_offset,
                                        total_kv_heads=total_kv_heads, **common)
    elif kind == "moh":
        def op(q, k, v, q_off, k_off, gates):
            return kernels.moh_attention(q, k, v, gates, causal=kw.get("causal", True), return_lse=True,
                                         q_offset=q_off, k_offset=k_off, **common)
    else:
        raise ValueError(f"kind {kind!r} has no softmax-family local op")
    return op
