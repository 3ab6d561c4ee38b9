"""The definition of Lightning attention: a token-by-token recurrence (slow, exact, any dtype).

Per query head ``h`` with decay ``λ = exp(-slope[h])`` and state ``S`` of shape ``[dk, dv]``::

    S_{-1} = initial_state (zeros if None)
    S_t    = λ S_{t-1} + k_tᵀ v_t
    o_t    = q_t S_t

No softmax, no scale. With GQA the k/v head ``h // (h / hkv)`` feeds query head ``h``; the decay
and the state belong to the query head. Computed in the dtype of ``q`` (pass fp64 for the truth,
a low-precision dtype for the flash-attn style "reference in the same precision").
"""

from __future__ import annotations

from typing import Optional

import torch


def lightning_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                        initial_state: Optional[torch.Tensor] = None,
                        cu_seqlens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[b, n, h, dk]``, k ``[b, n, hkv, dk]``, v ``[b, n, hkv, dv]``, slope ``[h]``.

    Returns ``(o [b, n, h, dv], final_state [b or num_docs, h, dk, dv])`` in q's dtype. With
    ``cu_seqlens`` (batch 1) the state restarts from ``initial_state[doc]`` at each document.
    """
    dt = q.dtype
    b, n, h, dk = q.shape
    group = h // k.shape[2]
    k = k.to(dt).repeat_interleave(group, dim=2)
    v = v.to(dt).repeat_interleave(group, dim=2)
    lam = torch.exp(-slope.to(dt))[:, None, None]
    if cu_seqlens is None:
        bounds = [(bi, 0, n) for bi in range(b)]
    else:
        c = cu_seqlens.tolist()
        bounds = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    rows: list[list[torch.Tensor]] = [[None] * n for _ in range(b)]  # type: ignore[list-item]
    finals = []
    for doc, (bi, start, end) in enumerate(bounds):
        if initial_state is None:
            s = torch.zeros(h, dk, v.shape[-1], dtype=dt, device=q.device)
        else:
            s = initial_state[doc].to(dt)
        for t in range(start, end):
            s = lam * s + k[bi, t][:, :, None] * v[bi, t][:, None, :]
            rows[bi][t] = torch.einsum("hd,hde->he", q[bi, t], s)
        finals.append(s)
    return torch.stack([torch.stack(r) for r in rows]), torch.stack(finals)
