"""Autograd glue for the Triton path: stitches ``lightning_fwd`` and ``lightning_bwd``."""

from __future__ import annotations

from typing import Optional

import torch

from ._plan import make_plan
from .triton_bwd import lightning_bwd
from .triton_fwd import lightning_fwd


class LightningFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                chunk_size: int):
        ctx.set_materialize_grads(False)  # an unused final_state gives no gradient seed
        b, n, h, dk = q.shape
        hkv, dv = k.shape[2], v.shape[-1]
        plan = make_plan(b, n, cu_seqlens, chunk_size, q.device)
        qf = q.contiguous().view(b * n, h, dk)
        kf = k.contiguous().view(b * n, hkv, dk)
        vf = v.contiguous().view(b * n, hkv, dv)
        sl = slope.to(torch.float32).contiguous()
        h0 = None if initial_state is None else initial_state.contiguous()
        o, ht = lightning_fwd(qf, kf, vf, sl, h0, plan)
        ctx.save_for_backward(qf, kf, vf, sl, h0)
        ctx.plan, ctx.shape = plan, (b, n, h, hkv, dk, dv)
        return o.view(b, n, h, dv), ht

    @staticmethod
    def backward(ctx, do: torch.Tensor, dht: Optional[torch.Tensor]):
        qf, kf, vf, sl, h0 = ctx.saved_tensors
        b, n, h, hkv, dk, dv = ctx.shape
        need_dh0 = h0 is not None and ctx.needs_input_grad[4]
        if do is None:
            do = torch.zeros(b, n, h, dv, dtype=qf.dtype, device=qf.device)
        dof = do.contiguous().view(b * n, h, dv)
        dht = None if dht is None else dht.to(torch.float32).contiguous()
        dq, dk_, dv_, dh0 = lightning_bwd(qf, kf, vf, sl, h0, dof, dht, ctx.plan, need_dh0)
        return (dq.view(b, n, h, dk), dk_.view(b, n, hkv, dk), dv_.view(b, n, hkv, dv),
                None, dh0, None, None)
