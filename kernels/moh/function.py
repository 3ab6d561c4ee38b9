"""Autograd Function for the Triton path: stitches the forward and backward launchers, nothing else."""

from __future__ import annotations

import torch

from .rows import ActiveRows, build_active_rows
from .triton_bwd import moh_bwd
from .triton_fwd import moh_fwd


class MoHAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, causal: bool,
                sm_scale: float, q_offset: int, k_offset: int, seg=None) -> tuple[torch.Tensor, torch.Tensor]:
        act = build_active_rows(gates)  # once per call; reused by the backward
        o, lse = moh_fwd(q, k, v, gates, act, causal=causal, sm_scale=sm_scale, q_offset=q_offset,
                         k_offset=k_offset, seg=seg)
        ctx.save_for_backward(q, k, v, gates, o, lse, act.rows, act.counts, act.prefix)
        ctx.args = (causal, sm_scale, q_offset, k_offset, seg)
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor, dlse: torch.Tensor):
        q, k, v, gates, o, lse, rows, counts, prefix = ctx.saved_tensors
        causal, sm_scale, q_offset, k_offset, seg = ctx.args
        dq, dk, dv, dgates = moh_bwd(do, dlse, q, k, v, gates, o, lse, ActiveRows(rows, counts, prefix),
                                     causal=causal, sm_scale=sm_scale, q_offset=q_offset, k_offset=k_offset, seg=seg)
        return dq, dk, dv, dgates, None, None, None, None, None
