"""Triton backward of MoH attention (launcher returns tensors; no autograd here).

With ``o = g * a`` (a = ungated attention) and upstream grads ``do``, ``dlse``:
``dgates = rowsum(do * a) = rowsum(do * o) / g``; the attention sees ``da = g * do`` and
``delta = rowsum(da * a) = rowsum(do * o)``, and the lse gradient enters as
``ds = p * (dp - delta + dlse)``, so one ``D = delta - dlse`` per row covers both.

* dq: one program per tile of a head's ACTIVE rows (same grid as the forward).
* dk/dv: one program per (key block, batch, kv head) loops over the heads of its GQA group and
  over their active-row tiles, starting at the first tile whose rows can see the block (causal,
  from the prefix counts). Each kv block is owned by exactly one program, so dk/dv need no atomics
  and are deterministic; the GQA group is summed in registers.
Inactive rows are never loaded: their lse is +inf in the backward copy, so any padded row gives p = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .counter import active_counter
from .rows import ActiveRows
from .triton_fwd import block_sizes, dot_precision, upcast_dots


@triton.jit
def _moh_bwd_dq_kernel(
    Q, K, V, G, DO, LSE, DELTA, DQ, ROWS, COUNTS, CNT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    SQ, SK, H, GROUP, D, sm_scale, q_offset, k_offset,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, COUNT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    n_act = tl.load(COUNTS + bh)
    if pid_m * BLOCK_M >= n_act:
        return
    off_b = (bh // H).to(tl.int64)
    off_h = bh % H
    off_kh = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < n_act
    rows = tl.load(ROWS + bh.to(tl.int64) * SQ + offs_m, mask=rmask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    md = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=md, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=md, other=0.0)
    gate = tl.load(G + off_b * stride_gb + rows * stride_gt + off_h * stride_gh, mask=rmask, other=0.0)
    da = (do.to(tl.float32) * gate.to(tl.float32)[:, None]).to(do.dtype)
    if UPCAST:
        q = q.to(tl.float32)
        da = da.to(tl.float32)
    lse2 = tl.load(LSE + bh.to(tl.int64) * SQ + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
    dlt = tl.load(DELTA + bh.to(tl.int64) * SQ + rows, mask=rmask, other=0.0)
    qpos = rows + q_offset
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        last = tl.max(tl.where(rmask, qpos, -1))
        hi = tl.minimum(tl.maximum(last - k_offset + 1, 0), SK)
    else:
        hi = SK
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < SK
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        valid = nmask[None, :]
        if CAUSAL:
            valid = valid & ((offs_n + k_offset)[None, :] <= qpos[:, None])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(da, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - dlt[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md)
    if COUNT:
        tl.atomic_add(CNT, tl.sum(rmask.to(tl.int32), 0))


@triton.jit
def _moh_bwd_dkdv_kernel(
    Q, K, V, G, DO, LSE, DELTA, DK, DV, ROWS, COUNTS, PREFIX,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    SQ, SK, H, HKV, GROUP, D, sm_scale, q_offset, k_offset,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkh = tl.program_id(1)
    off_b = (bkh // HKV).to(tl.int64)
    off_kh = bkh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < SK
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nd = nmask[:, None] & dmask[None, :]
    k = tl.load(K + off_b * stride_kb + off_kh * stride_kh + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=nd, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kh * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                mask=nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kpos = offs_n + k_offset
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, GROUP):
        off_h = off_kh * GROUP + j
        bh = (off_b * H + off_h).to(tl.int64)
        n_act = tl.load(COUNTS + bh)
        if CAUSAL:
            # rows below r0 cannot see this key block; skip their whole tiles
            r0 = tl.minimum(tl.maximum(pid_n * BLOCK_N + k_offset - q_offset, 0), SQ)
            lo = (tl.load(PREFIX + bh * (SQ + 1) + r0) // BLOCK_M) * BLOCK_M
        else:
            lo = 0
        for start_m in range(lo, n_act, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rmask = offs_m < n_act
            rows = tl.load(ROWS + bh * SQ + offs_m, mask=rmask, other=0).to(tl.int64)
            md = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                        mask=md, other=0.0)
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                         mask=md, other=0.0)
            gate = tl.load(G + off_b * stride_gb + rows * stride_gt + off_h * stride_gh, mask=rmask, other=0.0)
            da = (do.to(tl.float32) * gate.to(tl.float32)[:, None]).to(do.dtype)
            if UPCAST:
                q = q.to(tl.float32)
                da = da.to(tl.float32)
            lse2 = tl.load(LSE + bh * SQ + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
            dlt = tl.load(DELTA + bh * SQ + rows, mask=rmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
            valid = nmask[None, :]
            if CAUSAL:
                valid = valid & (kpos[None, :] <= (rows + q_offset)[:, None])
            p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(da.dtype)), da, input_precision=DOT_PREC)
            dp = tl.dot(da, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - dlt[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kh * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + off_b * stride_dvb + off_kh * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd)


def moh_bwd(do: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            gates: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, act: ActiveRows, *, causal: bool,
            sm_scale: float, q_offset: int,
            k_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dgates)`` for upstream ``do [b, sq, h, d]`` and ``dlse [b, h, sq]``.

    Inactive pairs get exactly zero dq and dgates and contribute nothing to dk/dv.
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    active = gates > 0
    rowdot = (do.float() * o.float()).sum(-1)  # [b, sq, h] = g * rowsum(do * a)
    dgates = torch.where(active, rowdot / torch.where(active, gates.float(), 1.0), 0.0).to(gates.dtype)
    delta = (rowdot.permute(0, 2, 1) - dlse.float()).contiguous()  # [b, h, sq]
    lse_bwd = torch.where(torch.isneginf(lse), float("inf"), lse).contiguous()  # rows with no key: p = 0
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    block_m, block_n, block_d = block_sizes(d, q.dtype)
    counter = active_counter()
    cnt = torch.zeros(1, dtype=torch.int32, device=q.device)
    common = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  UPCAST=upcast_dots(q.dtype), DOT_PREC=dot_precision(q.dtype), num_warps=4)
    strides = (q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               gates.stride(0), gates.stride(1), gates.stride(2),
               do.stride(0), do.stride(1), do.stride(2))
    _moh_bwd_dq_kernel[(triton.cdiv(sq, block_m), b * h)](
        q, k, v, gates, do, lse_bwd, delta, dq, act.rows, act.counts, cnt,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        sq, sk, h, h // hkv, d, sm_scale, q_offset, k_offset,
        COUNT=counter is not None, **common,
    )
    _moh_bwd_dkdv_kernel[(triton.cdiv(sk, block_n), b * hkv)](
        q, k, v, gates, do, lse_bwd, delta, dk, dv, act.rows, act.counts, act.prefix,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        sq, sk, h, hkv, h // hkv, d, sm_scale, q_offset, k_offset,
        **common,
    )
    if counter is not None:
        counter.backward += int(cnt.item())
    return dq, dk, dv, dgates
