"""One-token Lightning step for generation (the recurrence applied once)."""

from __future__ import annotations

import torch

from .._common import SUPPORTED_DTYPES


def lightning_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                          state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the Lightning recurrence by one token.

    Shapes (no sequence dimension): q ``[b, h, dk]``, k ``[b, hkv, dk]``, v ``[b, hkv, dv]``,
    slope ``[h]`` (>= 0), state fp32 ``[b, h, dk, dv]`` (the ``final_state`` of
    :func:`lightning_attention` on the prefix, or zeros)::

        new_state = exp(-slope[h]) * state + k_tᵀ v_t
        o         = q_t new_state

    Returns ``(o [b, h, dv] in q's dtype, new_state fp32 [b, h, dk, dv])``; token by token this
    equals :func:`lightning_attention` on the whole sequence. Math in fp32; differentiable.
    """
    from .api import _check_slope, _check_state

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [batch, heads, dim] (one token, no seq dim), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, dk = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != dk:
        raise ValueError(f"k [b, hkv, dk] / v [b, hkv, dv] do not match q [b, h, dk]: "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    hkv, dv = k.shape[1], v.shape[2]
    if h % hkv != 0:
        raise ValueError(f"num_kv_heads ({hkv}, k.shape[1]) must divide num_heads ({h}, q.shape[1])")
    _check_slope(slope, h, q.device)
    _check_state("state", state, b, h, dk, dv, q.device)
    g = h // hkv
    lam = torch.exp(-slope.to(torch.float32)).view(1, hkv, g, 1, 1)
    kv = (k.float()[:, :, :, None] * v.float()[:, :, None, :])[:, :, None]  # [b, hkv, 1, dk, dv]
    new_state = (lam * state.reshape(b, hkv, g, dk, dv) + kv).view(b, h, dk, dv)
    o = torch.einsum("bhd,bhde->bhe", q.float(), new_state)
    return o.to(q.dtype), new_state
