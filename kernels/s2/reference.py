"""Plain-torch definition of S2 and dense (flash) attention: a dense masked softmax.

This file defines the math and nothing else; it is O(seq^2) and meant for tests (run it in fp64
for the truth, in the working dtype for the flash-attn tolerance rule).

    token_mask[h, i, j] = same_doc(i, j)
                          and (not causal or q_pos(i) >= k_pos(j))
                          and (not window or q_pos(i) - k_pos(j) < window)          (dense only)
                          and block_mask[h // group, block(q_pos(i)), block(k_pos(j))]   (S2 only)
    s   = sm_scale * q_i . k_j           over visible j
    lse = log sum_j exp(s)               (-inf when no key is visible)
    o   = sum_j exp(s - lse) v_j         (0 when no key is visible)

Heads: kv head g of a head slice is global kv head ``kv_head_offset + g`` of ``total_kv_heads``.
Positions: q_pos(i) = q_offset + i, k_pos(j) = k_offset + j; with ``cu_seqlens`` positions and
blocks restart at each document start.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.kernels.s2.layout import S2Layout


def token_mask(num_heads: int, num_kv_heads: int, seq_q: int, seq_k: int, *, layout: Optional[S2Layout],
               causal: bool, q_offset: int, k_offset: int, cu_seqlens: Optional[torch.Tensor],
               kv_head_offset: int = 0, total_kv_heads: Optional[int] = None,
               window: Optional[int] = None) -> torch.Tensor:
    """bool [num_heads, seq_q, seq_k]: which keys each query sees."""
    if cu_seqlens is not None:
        cu = cu_seqlens.to("cpu", torch.int64)
        idx = torch.arange(seq_q)
        doc = torch.searchsorted(cu[1:], idx, right=True)
        qpos = kpos = idx - cu[doc]
        same = doc[:, None] == doc[None, :]
    else:
        qpos = q_offset + torch.arange(seq_q)
        kpos = k_offset + torch.arange(seq_k)
        same = torch.ones(seq_q, seq_k, dtype=torch.bool)
    mask = same
    if causal:
        mask = mask & (qpos[:, None] >= kpos[None, :])
    if window:
        mask = mask & (qpos[:, None] - kpos[None, :] < window)
    mask = mask[None].expand(num_heads, -1, -1)
    if layout is not None:
        bs = layout.block_size
        qb, kb = qpos // bs, kpos // bs
        nb = int(max(qb.max(), kb.max())) + 1
        total = layout.validate_head_slice(num_kv_heads, kv_head_offset, total_kv_heads)
        blocks = layout.kv_block_mask(num_kv_heads, torch.arange(nb), torch.arange(nb), kv_head_offset=kv_head_offset,
                                      total_kv_heads=total, num_heads=num_heads // num_kv_heads * total)
        blocks = blocks.repeat_interleave(num_heads // num_kv_heads, dim=0)
        mask = mask & blocks[:, qb][:, :, kb]
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Optional[S2Layout] = None,
                        causal: bool = True, sm_scale: Optional[float] = None, q_offset: Optional[int] = None,
                        k_offset: int = 0, cu_seqlens: Optional[torch.Tensor] = None, kv_head_offset: int = 0,
                        total_kv_heads: Optional[int] = None,
                        window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked softmax attention in q's dtype. q [b, sq, h, d], k/v [b, sk, hkv, d].

    Returns ``o`` [b, sq, h, d] and ``lse`` [b, h, sq] (float32, or float64 for fp64 inputs).
    Differentiable (also through ``lse``); rows without visible keys give o = 0, lse = -inf and
    zero gradients.
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = d ** -0.5
    if q_offset is None:
        q_offset = k_offset + sk - sq
    mask = token_mask(h, hkv, sq, sk, layout=layout, causal=causal or layout is not None, q_offset=q_offset,
                      k_offset=k_offset, cu_seqlens=cu_seqlens, kv_head_offset=kv_head_offset,
                      total_kv_heads=total_kv_heads, window=window).to(q.device)
    group = h // hkv
    kk = k.repeat_interleave(group, dim=2)
    vv = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * sm_scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(mask, torch.exp(s - m_safe), torch.zeros_like(s))
    denom = e.sum(-1, keepdim=True)
    seen = denom > 0
    p = e / torch.where(seen, denom, torch.ones_like(denom))
    o = torch.einsum("bhij,bjhd->bihd", p.to(v.dtype), vv)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_denom = torch.log(torch.where(seen, denom, torch.ones_like(denom)).to(lse_dtype))
    lse = torch.where(seen, m_safe.to(lse_dtype) + log_denom, torch.full_like(log_denom, float("-inf")))
    return o, lse.squeeze(-1)
