"""Chunked Lightning attention in plain torch: the CPU fallback and a second implementation.

Same math as ``reference.py`` in Lightning-2's tiling, chunk of ``C`` tokens starting at ``c0``,
``S`` the state after the previous chunk, ``i, j`` positions inside the chunk (length ``L``)::

    o_i   = Σ_{j≤i} λ^{i-j} (q_i·k_j) v_j   +   λ^{i+1} q_i S          (intra + inter)
    S_new = λ^L S + Σ_j λ^{L-1-j} k_jᵀ v_j

Every decay is ``exp(-slope * distance)`` with ``distance >= 0``: nothing overflows for any
slope or length. Differentiable through torch autograd (gradients for q, k, v, the initial state
and into the final state). Computes in fp32, or fp64 for fp64 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.kernels._common import host_ints


def _blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sl: torch.Tensor, s: torch.Tensor,
            L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive chunks of exactly ``L`` tokens, all at once except the state scan.

    q [b, m*L, hkv, g, dk], k/v [b, m*L, hkv, *], sl [hkv, g], s [b, hkv, g, dk, dv] (the state
    before the first chunk). Returns (o [b, m*L, hkv, g, dv], state after the last chunk).
    """
    b, n, hkv, g, dk = q.shape
    dv, m = v.shape[-1], n // L
    qc = q.reshape(b, m, L, hkv, g, dk)
    kc = k.reshape(b, m, L, hkv, dk)
    vc = v.reshape(b, m, L, hkv, dv)
    pos = torch.arange(L, device=q.device, dtype=sl.dtype)
    dist = pos[:, None] - pos[None, :]
    # [hkv, g, L, L]; clamp so the masked (negative) distances never reach exp
    decay = torch.exp(-sl[..., None, None] * dist.clamp(min=0)) * (dist >= 0)
    q_decay = torch.exp(-sl[..., None] * (pos + 1))            # [hkv, g, L]: λ^{i+1}
    k_decay = torch.exp(-sl[..., None] * (L - 1 - pos))        # λ^{L-1-j}
    scores = torch.einsum("bmlhgd,bmshd->bmhgls", qc, kc) * decay
    o = torch.einsum("bmhgls,bmshe->bmlhge", scores, vc)
    chunk_kv = torch.einsum("bmshd,hgs,bmshe->bmhgde", kc, k_decay, vc)
    lam_l = torch.exp(-sl * L)[None, ..., None, None]
    before = []
    for c in range(m):  # the only sequential part: one multiply-add per chunk
        before.append(s)
        s = lam_l * s + chunk_kv[:, c]
    o = o + torch.einsum("bmlhgd,hgl,bmhgde->bmlhge", qc, q_decay, torch.stack(before, dim=1))
    return o.reshape(b, n, hkv, g, dv), s


def _chunked_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                   state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, n, h, dk], k/v [b, n, hkv, *], state [b, h, dk, dv] (compute dtype)."""
    b, n, h, dk = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    g = h // hkv
    q5 = q.reshape(b, n, hkv, g, dk)
    s = state.reshape(b, hkv, g, dk, dv)
    sl = slope.view(hkv, g)
    full = n - n % chunk_size
    outs = []
    if full:
        o, s = _blocks(q5[:, :full], k[:, :full], v[:, :full], sl, s, chunk_size)
        outs.append(o)
    if full < n:  # the shorter last chunk
        o, s = _blocks(q5[:, full:], k[:, full:], v[:, full:], sl, s, n - full)
        outs.append(o)
    return torch.cat(outs, dim=1).reshape(b, n, h, dv), s.reshape(b, h, dk, dv)


def lightning_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                      initial_state: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None,
                      chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(o [b, n, h, dv] in q's dtype, final_state fp32 [b or num_docs, h, dk, dv])``.

    Inputs are assumed validated (see :func:`seqpar.kernels.lightning.api.lightning_attention`).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    qf, kf, vf, sl = q.to(cdt), k.to(cdt), v.to(cdt), slope.to(cdt)
    if cu_seqlens is None:
        s0 = (torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device) if initial_state is None
              else initial_state.to(cdt))
        o, s = _chunked_dense(qf, kf, vf, sl, s0, chunk_size)
        return o.to(q.dtype), s
    c = host_ints(cu_seqlens)
    outs, finals = [], []
    for d in range(len(c) - 1):
        s0 = (torch.zeros(1, h, dk, dv, dtype=cdt, device=q.device) if initial_state is None
              else initial_state[d:d + 1].to(cdt))
        a, e = c[d], c[d + 1]
        o, s = _chunked_dense(qf[:, a:e], kf[:, a:e], vf[:, a:e], sl, s0, chunk_size)
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(finals)
