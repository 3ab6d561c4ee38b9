"""Torch fallback that skips inactive (token, head) pairs: gather, attend, scatter.

Per (batch, kv head) the active (token, head) pairs of the whole GQA group are gathered into one
matrix of query rows, attend to that kv head's keys (never expanded; rows are chunked by blocks of
tokens and a causal chunk reads only the keys up to its block's end), and are scattered back.
Plain differentiable torch: autograd only sees the gathered rows, so backward skips the same
pairs. Math in fp32 regardless of the input dtype (CPU bf16 matmuls are slow and coarse).
"""

from __future__ import annotations

from typing import Optional

import torch

from .counter import PairCounter, active_counter

TOKEN_BLOCK = 128  # tokens per chunk of gathered rows


class _CountBackward(torch.autograd.Function):
    """Identity on one group's gathered output rows that counts its active pairs in backward."""

    @staticmethod
    def forward(ctx, counter: PairCounter, rows: int, *tensors: torch.Tensor):
        ctx.counter, ctx.rows = counter, rows
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        ctx.counter.backward += ctx.rows
        return (None, None, *grads)


def moh_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                        causal: bool, sm_scale: float, q_offset: int, k_offset: int,
                        need_lse: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``o [b, sq, h, d]`` (dtype of q) and fp32 ``lse [b, h, sq]`` (-inf when inactive),
    or None for lse when ``need_lse`` is False (saves one pass over the scores)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    counter = active_counter()
    active = gates > 0
    kpos = torch.arange(sk, device=q.device) + k_offset
    block_starts = torch.arange(0, sq + TOKEN_BLOCK, TOKEN_BLOCK, device=q.device)
    # empty slices that tie every input into the graph, so that with no active pair at all the
    # outputs still require grad and every input receives a zero (not a missing) gradient
    tie = q[:0, 0, 0].float() * gates[:0, 0, :1].float() + k[:0, 0, 0] + v[:0, 0, 0]  # [0, d] views, no copies
    o_rows, lse_rows = [tie.to(q.dtype)], [tie.float().sum(-1)]
    no_idx = torch.zeros(0, dtype=torch.long, device=q.device)
    o_idx, lse_idx = [no_idx], [no_idx]
    for bi in range(b):
        for g in range(hkv):
            # active (token, head) pairs of this GQA group, token-major so tokens ascend
            t, j = active[bi, :, g * group:(g + 1) * group].nonzero(as_tuple=True)
            n_active = t.numel()
            if counter is not None:
                counter.forward += n_active
            if causal:  # rows placed before every key see nothing: o = 0 and lse = -inf as initialised
                sees = t + q_offset >= k_offset
                t, j = t[sees], j[sees]
            if t.numel() == 0:
                continue
            heads = g * group + j
            outs, lses = [], []
            # one chunk per block of TOKEN_BLOCK tokens: bounded score memory, and causal chunks
            # read only the keys up to the block end whatever the active fraction
            edges = torch.searchsorted(t, block_starts).tolist()
            sizes = [r1 - r0 for r0, r1 in zip(edges[:-1], edges[1:])]
            # gather once per group and split (one concatenation in backward, not one scatter per chunk)
            q_chunks = q[bi, t, heads].float().split(sizes)
            g_chunks = gates[bi, t, heads].float().unsqueeze(-1).split(sizes)
            kg, vg = k[bi, :, g].float(), v[bi, :, g].float()
            for blk, (tc, qs, gs) in enumerate(zip(t.split(sizes), q_chunks, g_chunks)):
                if tc.numel() == 0:
                    continue
                hi, lo = sk, sk
                if causal:
                    first = blk * TOKEN_BLOCK + q_offset - k_offset  # last key every row of the block sees
                    hi = min(sk, first + TOKEN_BLOCK)
                    lo = min(max(first + 1, 0), hi)
                s = (qs @ kg[:hi].t()) * sm_scale  # [rows of the block, keys]
                if lo < hi:  # only the block's diagonal keys need the causal mask
                    s[:, lo:hi].masked_fill_(kpos[None, lo:hi] > (tc + q_offset)[:, None], float("-inf"))
                outs.append((gs * (torch.softmax(s, dim=-1) @ vg[:hi])).to(q.dtype))
                if need_lse:
                    lses.append(torch.logsumexp(s, dim=-1))
            group_rows = [torch.cat(outs)] + ([torch.cat(lses)] if need_lse else [])
            if counter is not None and group_rows[0].requires_grad:
                group_rows = _CountBackward.apply(counter, n_active, *group_rows)
            o_rows.append(group_rows[0])
            o_idx.append((bi * sq + t) * h + heads)
            if need_lse:
                lse_rows.append(group_rows[1])
                lse_idx.append((bi * h + heads) * sq + t)
    o = q.new_zeros(b * sq * h, d).index_copy(0, torch.cat(o_idx), torch.cat(o_rows)).view(b, sq, h, d)
    if not need_lse:
        return o, None
    lse = torch.full((b * h * sq,), float("-inf"), device=q.device, dtype=torch.float32)
    lse = lse.index_copy(0, torch.cat(lse_idx), torch.cat(lse_rows))
    return o, lse.view(b, h, sq)
