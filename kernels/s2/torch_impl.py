"""Pure-torch block-sparse S2 / dense attention (the CPU path without the Triton interpreter).

Loops over (kv head, q tile), gathers only the kv tiles the plan lists, and does an exact
softmax over them in fp32. Peak extra memory is one tile's scores, ``[b, group, block, listed
keys]``: O(seq * block), never a dense [seq, seq] matrix. Backward recomputes the scores from
(q, k, v, o, lse) tile by tile, with the same ``delta = rowsum(do * o) - dlse`` as the Triton
backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.kernels.s2.plan import TilePlan


def _tile_scores(plan: TilePlan, q: torch.Tensor, k: torch.Tensor, g: int, t: int, group: int, sm_scale: float):
    """(q rows slice, key index, fp32 scores [b, group, m, n] with -inf where invisible)."""
    qs, qe = int(plan.q_start[t]), min(int(plan.q_start[t]) + plan.block_size, int(plan.q_end[t]))
    kidx = plan.key_index(g, t).to(q.device)
    qt = q[:, qs:qe, g * group:(g + 1) * group].float()
    kt = k[:, kidx, g].float()
    s = torch.einsum("bmhd,bnd->bhmn", qt, kt) * sm_scale
    if plan.causal:
        qpos = torch.arange(qs, qe, device=q.device) + plan.q_shift
        kpos = kidx + plan.k_shift
        hidden = qpos[:, None] < kpos[None, :]
        if plan.window:  # the listed tiles can still hold keys past the window's lower edge
            hidden |= qpos[:, None] - kpos[None, :] >= plan.window
        s = s.masked_fill(hidden, float("-inf"))
    return slice(qs, qe), kidx, s


def s2_fwd_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan,
                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o [b, sq, h, d] (q's dtype), lse [b, h, sq] fp32."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    o = torch.zeros_like(q)
    lse = torch.full((b, h, sq), float("-inf"), device=q.device, dtype=torch.float32)
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        for t in range(plan.num_q_tiles):
            rows, kidx, s = _tile_scores(plan, q, k, g, t, group, sm_scale)
            if kidx.numel() == 0:
                continue
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(s - m)
            denom = e.sum(-1, keepdim=True)
            seen = denom > 0
            safe = torch.where(seen, denom, torch.ones_like(denom))
            o[:, rows, heads] = torch.einsum("bhmn,bnd->bmhd", e / safe, v[:, kidx, g].float()).to(q.dtype)
            lse[:, heads, rows] = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf"))).squeeze(-1)
    return o, lse


def s2_bwd_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, dlse: Optional[torch.Tensor], plan: TilePlan,
                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the input dtypes (fp32 accumulation)."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    # rows that saw nothing have lse = -inf: use +inf so their p (and every gradient) is 0
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        for t in range(plan.num_q_tiles):
            rows, kidx, s = _tile_scores(plan, q, k, g, t, group, sm_scale)
            if kidx.numel() == 0:
                continue
            p = torch.exp(s - lse_safe[:, heads, rows, None])
            dot = do[:, rows, heads].float()
            # delta = rowsum(do * o) - dlse, per tile in fp64 (dp - delta cancels for peaked rows)
            delta = (dot.double() * o[:, rows, heads].double()).sum(-1).transpose(1, 2)
            if dlse is not None:
                delta = delta - dlse[:, heads, rows].double()
            dv[:, :, g].index_add_(1, kidx, torch.einsum("bhmn,bmhd->bnd", p, dot))
            dp = torch.einsum("bmhd,bnd->bhmn", dot, v[:, kidx, g].float())
            ds = p * (dp - delta[..., None].float()) * sm_scale
            dq[:, rows, heads] += torch.einsum("bhmn,bnd->bmhd", ds, k[:, kidx, g].float())
            dk[:, :, g].index_add_(1, kidx, torch.einsum("bhmn,bmhd->bnd", ds, q[:, rows, heads].float()))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
