"""Autograd Function for S2 / dense attention: stitches a forward launcher to its backward.

Saves only (q, k, v, o, lse); the backward recomputes scores tile by tile. ``lse`` is a real
output, so losses that use it (CP merges) get correct dq/dk/dv.
"""

from __future__ import annotations

import torch

from seqpar.kernels.s2.plan import TilePlan


class S2AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, sm_scale: float,
                backend: str):
        if backend == "triton":
            from seqpar.kernels.s2.triton_fwd import s2_fwd

            o, lse = s2_fwd(q, k, v, plan, sm_scale)
        else:
            from seqpar.kernels.s2.torch_impl import s2_fwd_torch

            o, lse = s2_fwd_torch(q, k, v, plan, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)  # an unused lse arrives as None, not a zeros tensor
        ctx.plan, ctx.sm_scale, ctx.backend = plan, sm_scale, backend
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        if ctx.backend == "triton":
            from seqpar.kernels.s2.triton_bwd import s2_bwd

            dq, dk, dv = s2_bwd(q, k, v, o, lse, do, dlse, ctx.plan, ctx.sm_scale)
        else:
            from seqpar.kernels.s2.torch_impl import s2_bwd_torch

            dq, dk, dv = s2_bwd_torch(q, k, v, o, lse, do, dlse, ctx.plan, ctx.sm_scale)
        return dq, dk, dv, None, None, None
