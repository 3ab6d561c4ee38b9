"""Triton backward launchers for S2 / dense attention (recomputing, flash-attn 2 style).

With ``o = sum_j p_j v_j``, ``lse = log sum_j exp(s_j)`` and upstream ``do``, ``dlse``:

    dL/ds_j = p_j * (do . v_j) - p_j * (do . o) + dlse * p_j = p_j * (dp_j - delta_j)
    delta   = rowsum(do * o) - dlse

so the gradient through ``lse`` only shifts the per-row ``delta``. dq walks the CSR lists (one
program per q tile and q head); dk/dv walk the CSC lists (one program per kv tile and kv head,
summing over the q heads of its GQA group), so no atomics are needed. Rows that saw no key
(lse = -inf) are treated as lse = +inf: p = 0 and every gradient they feed is 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqpar.kernels.s2.plan import TilePlan
from seqpar.kernels._grid import unfold
from seqpar.kernels._tuning import W4S3, launch
from seqpar.kernels.s2.triton_fwd import (LOG2E, PREPROCESS_BLOCK, TUNE_KEY, block_dim, grids, kernel_options,
                                          mask_tile, plan_row, plan_tuning)

PREPROCESS_CONFIG = W4S3  # Triton's default launch config (4 warps, 3 stages), as before


@triton.jit
def _s2_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, seq_q, head_dim,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dlb, stride_dlh, stride_dls,
    num_heads,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta = rowsum(do * o) - dlse. The row sum runs in fp64 in registers: dp - delta cancels
    # almost exactly for peaked rows, and fp32 rounding here would dominate the dq error.
    t, h, b = unfold(tl.program_id(0), tl.cdiv(seq_q, BLOCK_M), num_heads)
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    offs_m = t.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    md_ok = m_ok[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=md_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=md_ok, other=0.0)
    delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_dlb + h * stride_dlh + offs_m * stride_dls, mask=m_ok, other=0.0).to(tl.float64)
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m * stride_ls, delta.to(tl.float32), mask=m_ok)


@triton.jit
def _s2_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CNT,
    q_start_ptr, q_end_ptr, kv_start_ptr, kv_end_ptr, rows_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    num_q_tiles, group, q_shift, k_shift, window, scale_log2, sm_scale, stride,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = num_q_tiles - 1 - tl.program_id(0)  # heaviest (last) q tiles first
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // group
    l_base = b * stride_lb + h.to(tl.int64) * stride_lh  # head x seq can pass 2^31 (head x dim cannot)
    q_lo = tl.load(q_start_ptr + t)
    q_hi = tl.load(q_end_ptr + t)
    # 64-bit scalar bases, 32-bit offsets inside a tile (see the forward)
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = q_lo + ar_m
    m_ok = offs_m < q_hi
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    row0 = q_lo.to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row0 * stride_qs
                + ar_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=md_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + row0 * stride_dos
                 + ar_m[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + l_base + row0 + ar_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_base + row0 + ar_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    k_off = ar_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    vt_off = ar_n[None, :] * stride_vs + offs_d[:, None] * stride_vd
    s1, n1, s2, n2 = plan_row(rows_ptr, g, t, num_q_tiles)
    for i in range(0, n1 + n2):
        u = tl.where(i < n1, s1 + i * stride, s2 + (i - n1))
        k_lo = tl.load(kv_start_ptr + u)
        k_hi = tl.load(kv_end_ptr + u)
        offs_n = k_lo + ar_n
        n_ok = offs_n < k_hi
        k64 = k_lo.to(tl.int64)
        k = tl.load(k_base + k64 * stride_ks + k_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(v_base + k64 * stride_vs + vt_off, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = mask_tile(p, 0.0, offs_m, offs_n, q_lo, k_lo, k_hi, q_shift, k_shift, window,
                      CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if COUNT:
            tl.atomic_add(CNT, 1)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dqs
             + ar_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _s2_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CNT,
    q_start_ptr, q_end_ptr, kv_start_ptr, kv_end_ptr, cols_ptr, tile_ids,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lb, stride_lh,
    num_kv_tiles, group, q_shift, k_shift, window, scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    k_lo = tl.load(kv_start_ptr + u)
    k_hi = tl.load(kv_end_ptr + u)
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = k_lo + ar_n
    n_ok = offs_n < k_hi
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k64 = k_lo.to(tl.int64)
    k = tl.load(K + b * stride_kb + g * stride_kh + k64 * stride_ks
                + ar_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=nd_ok, other=0.0)
    v = tl.load(V + b * stride_vb + g * stride_vh + k64 * stride_vs
                + ar_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_off = ar_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    do_off = ar_m[:, None] * stride_dos + offs_d[None, :] * stride_dod
    col = cols_ptr + (g * num_kv_tiles + u) * 2  # plan column: q tiles lo .. hi - 1
    lo = tl.load(col)
    hi = lo + tl.load(col + 1)
    for hq in range(group):
        h = g * group + hq
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        l_base = b * stride_lb + h * stride_lh  # heads x seq < 2^31 (the launcher checks it)
        # q tile t = idx, read through plan.tile_ids (an arange) rather than used as the loop index:
        # with the induction variable itself ptxas spilled 4-44 B at 255 registers (sm_90, d = 128)
        for idx in range(lo, hi):
            t = tl.load(tile_ids + idx)
            q_lo = tl.load(q_start_ptr + t)
            q_hi = tl.load(q_end_ptr + t)
            offs_m = q_lo + ar_m
            m_ok = offs_m < q_hi
            md_ok = m_ok[:, None] & d_ok[None, :]
            row0 = q_lo.to(tl.int64)
            q = tl.load(q_base + row0 * stride_qs + q_off, mask=md_ok, other=0.0)
            do = tl.load(do_base + row0 * stride_dos + do_off, mask=md_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + l_base + row0 + ar_m, mask=m_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + l_base + row0 + ar_m, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.math.exp2(s - lse2[:, None])
            # q rows past q_hi loaded q = do = lse = delta = 0, so they add exactly 0 to dk and dv
            p = mask_tile(p, 0.0, offs_m, offs_n, q_lo, k_lo, k_hi, q_shift, k_shift, window,
                      CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            if COUNT:
                tl.atomic_add(CNT, 1)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + g * stride_dkh + k64 * stride_dks
             + ar_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + b * stride_dvb + g * stride_dvh + k64 * stride_dvs
             + ar_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=nd_ok)


def s2_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
           do: torch.Tensor, dlse: Optional[torch.Tensor], plan: TilePlan, sm_scale: float,
           counters: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv (input dtypes) for upstream ``do`` [b, sq, h, d] and ``dlse`` [b, h, sq] or None.

    ``counters`` (debug): two int32 [1] tensors that the dq and dk/dv kernels bump once per
    computed (q head, q tile, kv tile) block.
    """
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    plan = plan.to(q.device)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    grid = grids(plan.num_q_tiles, plan.num_kv_tiles, b, h, hkv, sq)
    launch(_s2_bwd_preprocess_kernel, grid["preprocess"], (
        o, do, dlse if dlse is not None else lse, delta, sq, d,
        *o.stride(), *do.stride(), lse.stride(0), lse.stride(1), lse.stride(2),
        *(dlse.stride() if dlse is not None else lse.stride()), h,
    ), dict(HAS_DLSE=dlse is not None, BLOCK_M=PREPROCESS_BLOCK, BLOCK_D=block_dim(d)),
        default=PREPROCESS_CONFIG, space=(PREPROCESS_CONFIG,), key=(), device=q.device, tunable=False)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    consts = dict(CAUSAL=plan.causal, WINDOW=plan.window > 0, COUNT=counters is not None,
                  **kernel_options(q, plan.block_size))
    cnt_dq, cnt_kv = counters if counters is not None else (lse, lse)
    tune = plan_tuning("dq", plan, q)
    launch(_s2_bwd_dq_kernel, grid["dq"], (
        q, k, v, do, lse, delta, dq, cnt_dq,
        plan.q_start, plan.q_end, plan.kv_start, plan.kv_end, plan.rows,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), lse.stride(0), lse.stride(1),
        plan.num_q_tiles, h // hkv, plan.q_shift, plan.k_shift, plan.window, sm_scale * LOG2E, sm_scale,
        plan.stride,
    ), consts, default=tune.default, space=tune.space, key=TUNE_KEY, device=q.device, tunable=counters is None)
    tune = plan_tuning("dkdv", plan, q)
    launch(_s2_bwd_dkdv_kernel, grid["dkdv"], (
        q, k, v, do, lse, delta, dk, dv, cnt_kv,
        plan.q_start, plan.q_end, plan.kv_start, plan.kv_end, plan.cols, plan.tile_ids,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), lse.stride(1),
        plan.num_kv_tiles, h // hkv, plan.q_shift, plan.k_shift, plan.window, sm_scale * LOG2E, sm_scale,
    ), consts, default=tune.default, space=tune.space, key=TUNE_KEY, device=q.device, tunable=counters is None)
    return dq, dk, dv
