"""Definition of Mixture-of-Head attention (plain torch; run it in float64 for a test's truth).

Every head is computed for every token, then multiplied by its gate: exactly what the MoH release
does, and exactly what the skipping kernels must reproduce. Nothing here skips work.
"""

from __future__ import annotations

from typing import Optional

import torch


def moh_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                      causal: bool = True, sm_scale: Optional[float] = None,
                      q_offset: Optional[int] = None, k_offset: int = 0,
                      cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-heads MoH attention in the dtype of ``q`` (pass float64 tensors for the truth).

    q ``[b, sq, h, d]``, k/v ``[b, sk, hkv, d]``, gates ``[b, sq, h]`` (>= 0).
    Query i sits at ``q_offset + i`` (default ``k_offset + sk - sq``), key j at ``k_offset + j``;
    causal visibility is ``q_pos >= k_pos``. ``cu_seqlens`` (batch 1, offsets 0): packed documents;
    a query sees only the keys of its own document.

    Returns ``o [b, sq, h, d] = gates * softmax_attention`` and the fp32-or-wider
    ``lse [b, h, sq]`` of the ungated scores, ``-inf`` where the gate is 0 or the row sees no key.
    A row that sees no key has ``o = 0``.

    A pair with gate 0 is not part of the computation, so its gate gets gradient 0 (not the
    attention output it would multiply): the gate enters as ``where(gates > 0, gates, 0)``. MoH
    gates are 0 exactly where a top-k mask dropped the head, which passes no gradient either.
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    if q_offset is None:
        q_offset = k_offset + sk - sq
    kx = k.repeat_interleave(h // hkv, dim=2)  # the reference may expand GQA; the kernels do not
    vx = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kx) * scale
    if causal:
        qpos = torch.arange(sq, device=q.device) + q_offset
        kpos = torch.arange(sk, device=q.device) + k_offset
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    if cu_seqlens is not None:
        bounds = cu_seqlens.detach().to("cpu", torch.int64)
        doc = torch.bucketize(torch.arange(sq), bounds[1:], right=True).to(q.device)
        s = s.masked_fill(doc[None, :] != doc[:, None], float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no visible key
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    seen = l > 0
    l_safe = torch.where(seen, l, torch.ones_like(l))
    attn = torch.einsum("bhqk,bkhd->bqhd", p / l_safe, vx)
    lse = torch.where(seen, m + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
    g = torch.where(gates > 0, gates, torch.zeros_like(gates))
    o = attn * g.to(attn.dtype).unsqueeze(-1)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.where(gates.permute(0, 2, 1) > 0, lse.to(lse_dtype), torch.full_like(lse, float("-inf"), dtype=lse_dtype))
    return o, lse
