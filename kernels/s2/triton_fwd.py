"""Triton forward launcher for S2 / dense attention: online softmax over the plan's CSR lists.

One program per (q tile, q head, batch); it reads kv head ``h // group`` (GQA without expanding
k/v) and loops only over the kv tiles listed for (kv head, q tile). Scores use exp2 with
``log2(e)`` folded into the scale; accumulation and lse are fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.kernels._common import interpret_enabled
from seqpar.kernels._grid import check_grid
from seqpar.kernels._tuning import Tuning, attention_tuning, launch
from seqpar.kernels.s2.plan import TilePlan

LOG2E = 1.4426950408889634


@triton.jit
def mask_tile(x, fill, offs_m, offs_n, q_lo, k_lo, k_hi, q_shift, k_shift, window,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Set invisible (q, k) entries of a score/prob tile to ``fill``. Only the kv tail tile and,
    when causal, tiles that cross the diagonal (with a sliding window: or its lower edge) need it;
    interior tiles skip the compares."""
    needs = k_lo + BLOCK_N > k_hi
    if CAUSAL:
        needs = needs | (k_lo + k_shift + (BLOCK_N - 1) > q_lo + q_shift)
    if WINDOW:
        needs = needs | (q_lo + q_shift + (BLOCK_M - 1) - (k_lo + k_shift) >= window)
    if needs:
        ok = offs_n[None, :] < k_hi
        if CAUSAL:
            ok = ok & ((offs_m[:, None] + q_shift) >= (offs_n[None, :] + k_shift))
        if WINDOW:
            ok = ok & ((offs_m[:, None] + q_shift) - (offs_n[None, :] + k_shift) < window)
        x = tl.where(ok, x, fill)
    return x


@triton.jit
def plan_row(rows_ptr, g, t, num_q_tiles):
    """Runs of plan row (kv head g, q tile t): ``(s1, n1, s2, n2)``; its ``i``-th kv tile is
    ``s1 + i * stride`` for ``i < n1`` (the vertical stride), then ``s2 + i - n1`` (the band)."""
    row = rows_ptr + (g * num_q_tiles + t) * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _s2_fwd_kernel(
    Q, K, V, O, LSE, CNT,
    q_start_ptr, q_end_ptr, kv_start_ptr, kv_end_ptr, rows_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh,
    num_q_tiles, group, q_shift, k_shift, window, scale_log2, stride,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (q tiles, heads, batch) (see grids); last q tiles read the most kv tiles under
    # causality: launch them first (shorter tail)
    t = num_q_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // group
    q_lo = tl.load(q_start_ptr + t)
    q_hi = tl.load(q_end_ptr + t)
    # 64-bit scalar bases (packed varlen can pass 2^31 elements), 32-bit offsets inside a tile:
    # per-element 64-bit address math would cost two registers per element
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = q_lo + ar_m
    m_ok = offs_m < q_hi
    d_ok = offs_d < HEAD_DIM  # folds away when BLOCK_D == HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh + q_lo.to(tl.int64) * stride_qs
    q = tl.load(q_base + ar_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot mishandles bf16
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    k_off = ar_n[:, None] * stride_ks + offs_d[None, :] * stride_kd  # loop-invariant tile offsets
    v_off = ar_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    s1, n1, s2, n2 = plan_row(rows_ptr, g, t, num_q_tiles)
    for i in range(0, n1 + n2):
        u = tl.where(i < n1, s1 + i * stride, s2 + (i - n1))
        k_lo = tl.load(kv_start_ptr + u)
        k_hi = tl.load(kv_end_ptr + u)
        offs_n = k_lo + ar_n
        n_ok = offs_n < k_hi
        k64 = k_lo.to(tl.int64)
        k = tl.load(k_base + k64 * stride_ks + k_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + k64 * stride_vs + v_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = mask_tile(s, float("-inf"), offs_m, offs_n, q_lo, k_lo, k_hi, q_shift, k_shift, window,
                      CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        if COUNT:
            tl.atomic_add(CNT, 1)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    o_base = O + b * stride_ob + h * stride_oh + q_lo.to(tl.int64) * stride_os
    tl.store(o_base + ar_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # head x seq can pass 2^31 (lse is [batch, heads, seq]); head x head dim (q's strides) cannot
    tl.store(LSE + b * stride_lb + h.to(tl.int64) * stride_lh + q_lo.to(tl.int64) + ar_m, lse, mask=m_ok)


def kernel_options(q: torch.Tensor, block_size: int) -> dict:
    """Compile-time constants shared by the forward and backward launchers."""
    interp = interpret_enabled() and q.device.type == "cpu"
    return dict(
        UPCAST=interp and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HEAD_DIM=q.shape[-1], BLOCK_M=block_size, BLOCK_N=block_size, BLOCK_D=block_dim(q.shape[-1]),
    )


def plan_tuning(kind: str, plan: TilePlan, q: torch.Tensor) -> Tuning:
    """Launch config of kernel ``kind`` ("fwd", "dq", "dkdv") for ``plan`` on ``q``'s target: a
    sliding window compiles its own specialisation (one more compare per masked tile), tuned as op
    "window" (which falls back to S2 / flash's entry where that does not spill)."""
    return attention_tuning(kind, plan.block_size, q.shape[-1], q.dtype, q.device,
                            op="window" if plan.window > 0 else "s2")


def block_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


PREPROCESS_BLOCK = 64  # rows per program of the backward's delta preprocess


def grids(num_q_tiles: int, num_kv_tiles: int, batch: int, heads: int, kv_heads: int, seq_q: int) -> dict:
    """Launch grids of the S2 / flash kernels (forward, backward preprocess, dq, dk/dv): (tiles,
    heads, batch), tiles on axis 0 (CUDA: up to 2^31 - 1), heads and batch on axes 1 and 2 (up to
    65535 each: a larger batch is a ValueError; fold it into the sequence with cu_seqlens). The
    kernels read their indices from ``tl.program_id`` directly: a folded 1-D grid would keep the
    divided indices in registers and tip the sm_90 dk/dv kernel (255 registers) into spills.
    Checked against CUDA's limits; the launchers use exactly these."""
    if heads * seq_q >= 2 ** 31:  # lse / delta [batch, heads, seq]: the dk/dv kernel's head offset is 32-bit
        raise ValueError(f"s2 / flash attention: heads x seq_q = {heads} x {seq_q} must stay below 2^31 per call; "
                         f"split the call")
    return {
        "fwd": check_grid("s2 fwd", (num_q_tiles, heads, batch)),
        "preprocess": check_grid("s2 bwd preprocess", (triton.cdiv(seq_q, PREPROCESS_BLOCK) * heads * batch,)),
        "dq": check_grid("s2 bwd dq", (num_q_tiles, heads, batch)),
        "dkdv": check_grid("s2 bwd dk/dv", (num_kv_tiles, kv_heads, batch)),
    }


def s2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, sm_scale: float,
           counter: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o [b, sq, h, d] (q's dtype) and lse [b, h, sq] fp32. ``counter`` (int32 [1], debug): the
    kernel adds 1 per computed (q head, q tile, kv tile) block."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    plan = plan.to(q.device)
    o = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    grid = grids(plan.num_q_tiles, plan.num_kv_tiles, b, h, hkv, sq)["fwd"]
    consts = dict(CAUSAL=plan.causal, WINDOW=plan.window > 0, COUNT=counter is not None,
                  **kernel_options(q, plan.block_size))
    tune = plan_tuning("fwd", plan, q)
    launch(_s2_fwd_kernel, grid, (
        q, k, v, o, lse, counter if counter is not None else lse,
        plan.q_start, plan.q_end, plan.kv_start, plan.kv_end, plan.rows,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0), lse.stride(1),
        plan.num_q_tiles, h // hkv, plan.q_shift, plan.k_shift, plan.window, sm_scale * LOG2E, plan.stride,
    ), consts, default=tune.default, space=tune.space, key=TUNE_KEY, device=q.device, tunable=counter is None)
    return o, lse


# what decides the best config (dtypes are added by triton.autotune)
TUNE_KEY = ("HEAD_DIM", "BLOCK_M", "CAUSAL", "WINDOW", "group")
