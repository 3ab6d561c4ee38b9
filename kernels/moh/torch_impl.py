"""Torch fallback that skips inactive (token, head) pairs: gather, attend, scatter.

Per (batch, kv head) the active (token, head) pairs of the whole GQA group are gathered into one
matrix of query rows, attend to that kv head's keys (never expanded), and are scattered back.
Plain differentiable torch: autograd only sees the gathered rows, so backward skips the same
pairs. Math in fp32 regardless of the input dtype (CPU bf16 matmuls are slow and coarse).
"""

from __future__ import annotations

import torch

from .counter import PairCounter, active_counter


class _CountBackward(torch.autograd.Function):
    """Identity on one group's gathered (out, lse) rows that counts them when backward visits them."""

    @staticmethod
    def forward(ctx, counter: PairCounter, out: torch.Tensor, lse: torch.Tensor):
        ctx.counter, ctx.rows = counter, out.shape[0]
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor):
        ctx.counter.backward += ctx.rows
        return None, dout, dlse


def moh_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                        causal: bool, sm_scale: float, q_offset: int,
                        k_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``o [b, sq, h, d]`` (dtype of q) and fp32 ``lse [b, h, sq]`` (-inf when inactive)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    counter = active_counter()
    active = gates > 0
    kpos = torch.arange(sk, device=q.device) + k_offset
    # empty slices that tie every input into the graph, so that with no active pair at all the
    # outputs still require grad and every input receives a zero (not a missing) gradient
    tie = q.reshape(-1, d)[:0].float() * gates.reshape(-1)[:0, None] + k.reshape(-1, d)[:0] + v.reshape(-1, d)[:0]
    o_rows, lse_rows = [tie.to(q.dtype)], [tie.float().sum(-1)]
    no_idx = torch.zeros(0, dtype=torch.long, device=q.device)
    o_idx, lse_idx = [no_idx], [no_idx]
    for bi in range(b):
        for g in range(hkv):
            t, j = active[bi, :, g * group:(g + 1) * group].nonzero(as_tuple=True)
            if t.numel() == 0:
                continue
            heads = g * group + j
            qs = q[bi, t, heads].float()  # [n, d]: only the active pairs
            s = (qs @ k[bi, :, g].float().t()) * sm_scale  # [n, sk]
            if causal:
                s = s.masked_fill(kpos[None, :] > (t + q_offset)[:, None], float("-inf"))
            m = s.amax(dim=-1, keepdim=True).detach()
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # row with no visible key
            p = torch.exp(s - m)
            l = p.sum(dim=-1, keepdim=True)
            seen = l > 0
            l_safe = torch.where(seen, l, torch.ones_like(l))
            attn = (p @ v[bi, :, g].float()) / l_safe
            out = (gates[bi, t, heads].float().unsqueeze(-1) * attn).to(q.dtype)
            lse = torch.where(seen, m + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
            if counter is not None:
                counter.forward += t.numel()
                if out.requires_grad:
                    out, lse = _CountBackward.apply(counter, out, lse)
            o_rows.append(out)
            o_idx.append((bi * sq + t) * h + heads)
            lse_rows.append(lse)
            lse_idx.append((bi * h + heads) * sq + t)
    o = q.new_zeros(b * sq * h, d)
    lse = torch.full((b * h * sq,), float("-inf"), device=q.device, dtype=torch.float32)
    o = o.index_copy(0, torch.cat(o_idx), torch.cat(o_rows))
    lse = lse.index_copy(0, torch.cat(lse_idx), torch.cat(lse_rows))
    return o.view(b, sq, h, d), lse.view(b, h, sq)
