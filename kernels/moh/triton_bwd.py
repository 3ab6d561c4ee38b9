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

from typing import Optional

import torch
import triton
import triton.language as tl

from .counter import active_counter
from .rows import ActiveRows
from .._tuning import W4S3, attention_tuning, launch
from .triton_fwd import TUNE_KEY, block_sizes, doc_visible, dot_precision, grids, needs_idx64, row_program, upcast_dots


@triton.jit
def _moh_bwd_preprocess_kernel(
    O, DO, G, LSE, DLSE, DG, DELTA, LSE_BWD, ROWS, COUNTS,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_gb, stride_gt, stride_gh,
    stride_dgb, stride_dgt, stride_dgh,
    stride_dlb, stride_dlh, stride_dlt,
    SQ, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IDX64: tl.constexpr,
):
    # Active rows only (same grid as the forward): rowdot = rowsum(do * o) = g * rowsum(do * a),
    # dgates = rowdot / g, delta = rowdot - dlse, and the backward's lse (+inf where -inf: a row
    # that saw no key gets p = 0). Inactive rows are never read, so nothing is written for them.
    pid_m, bh = row_program(SQ, BLOCK_M)  # same grid as the forward
    n_act = tl.load(COUNTS + bh)
    if pid_m * BLOCK_M >= n_act:
        return
    off_b = (bh // H).to(tl.int64)
    off_h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < n_act
    rows = tl.load(ROWS + bh.to(tl.int64) * SQ + offs_m, mask=rmask, other=0)
    if IDX64:
        rows = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    md = rmask[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=md, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=md, other=0.0)
    rowdot = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    gate = tl.load(G + off_b * stride_gb + rows * stride_gt + off_h * stride_gh, mask=rmask, other=1.0)
    tl.store(DG + off_b * stride_dgb + rows * stride_dgt + off_h * stride_dgh,
             (rowdot / gate.to(tl.float32)).to(DG.dtype.element_ty), mask=rmask)
    dlse = tl.load(DLSE + off_b * stride_dlb + off_h * stride_dlh + rows * stride_dlt, mask=rmask, other=0.0)
    base = bh.to(tl.int64) * SQ
    tl.store(DELTA + base + rows, rowdot - dlse.to(tl.float32), mask=rmask)
    lse = tl.load(LSE + base + rows, mask=rmask, other=0.0)
    tl.store(LSE_BWD + base + rows, tl.where(lse == float("-inf"), float("inf"), lse), mask=rmask)


@triton.jit
def _moh_bwd_dq_kernel(
    Q, K, V, G, DO, LSE, DELTA, DQ, ROWS, COUNTS, CNT, SEG,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    SQ, SK, H, GROUP, sm_scale, q_offset, k_offset,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_m, bh = row_program(SQ, BLOCK_M)  # same grid as the forward
    n_act = tl.load(COUNTS + bh)
    if pid_m * BLOCK_M >= n_act:
        return
    off_b = (bh // H).to(tl.int64)
    off_h = bh % H
    off_kh = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < n_act
    rows = tl.load(ROWS + bh.to(tl.int64) * SQ + offs_m, mask=rmask, other=0)
    if IDX64:  # 32-bit row offsets (and causal compares) unless a batch element passes 2^31
        rows = rows.to(tl.int64)
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
    lo = 0
    if VARLEN:  # offsets are 0: a row sees the keys [doc start, doc end) of its document
        seg_lo = tl.load(SEG + rows, mask=rmask, other=0)
        seg_hi = tl.load(SEG + SQ + rows, mask=rmask, other=0)
        lo = tl.min(tl.where(rmask, seg_lo, SK))
    if CAUSAL:
        last = tl.max(tl.where(rmask, qpos, -1))
        first = tl.min(tl.where(rmask, qpos, last))
        hi = tl.minimum(tl.maximum(last - k_offset + 1, 0), SK)
    elif VARLEN:
        hi = tl.max(tl.where(rmask, seg_hi, 0))
    else:
        hi = SK
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ar_n = tl.arange(0, BLOCK_N)
    k_off = ar_n[:, None] * stride_kt + offs_d[None, :]  # 32-bit tile offsets, 64-bit scalar base
    v_off = ar_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + ar_n
        nmask = offs_n < SK
        n64 = tl.full([], start_n, tl.int64)
        k = tl.load(k_base + n64 * stride_kt + k_off, mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + n64 * stride_vt + v_off, mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if VARLEN:  # a tile's rows may span documents: always mask
            p = tl.where(doc_visible(offs_n, nmask, seg_lo, seg_hi, rows, CAUSAL), p, 0.0)
        else:
            needs = start_n + BLOCK_N > SK  # the mask only where it can matter (tail, diagonal)
            if CAUSAL:
                needs = needs | (start_n + BLOCK_N - 1 + k_offset > first)
            if needs:
                valid = nmask[None, :]
                if CAUSAL:
                    valid = valid & ((offs_n + k_offset)[None, :] <= qpos[:, None])
                p = tl.where(valid, p, 0.0)
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
    Q, K, V, G, DO, LSE, DELTA, DK, DV, ROWS, COUNTS, PREFIX, SEG,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    SQ, SK, H, HKV, GROUP, sm_scale, q_offset, k_offset,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_n, bkh = row_program(SK, BLOCK_N)  # (key block, batch x kv head) folded into axis 0
    off_b = (bkh // HKV).to(tl.int64)
    off_kh = bkh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < SK
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nd = nmask[:, None] & dmask[None, :]
    n64 = pid_n.to(tl.int64) * BLOCK_N
    ar_n = tl.arange(0, BLOCK_N)
    k = tl.load(K + off_b * stride_kb + off_kh * stride_kh + n64 * stride_kt + ar_n[:, None] * stride_kt + offs_d[None, :],
                mask=nd, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kh * stride_vh + n64 * stride_vt + ar_n[:, None] * stride_vt + offs_d[None, :],
                mask=nd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kpos = offs_n + k_offset
    kmax = pid_n * BLOCK_N + BLOCK_N - 1 + k_offset
    tail = pid_n * BLOCK_N + BLOCK_N > SK
    if VARLEN:  # rows that can read this key block: from its first key's document to its last's end
        n_first = pid_n * BLOCK_N
        r_end = tl.load(SEG + SQ + tl.minimum(n_first + BLOCK_N, SK) - 1)
        if CAUSAL:
            r_start = n_first
        else:
            r_start = tl.load(SEG + n_first)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, GROUP):
        off_h = off_kh * GROUP + j
        bh = (off_b * H + off_h).to(tl.int64)
        n_act = tl.load(COUNTS + bh)
        if VARLEN:  # only the active rows of the documents this key block belongs to
            lo = (tl.load(PREFIX + bh * (SQ + 1) + r_start) // BLOCK_M) * BLOCK_M
            n_act = tl.load(PREFIX + bh * (SQ + 1) + r_end)
        elif CAUSAL:
            # rows below r0 cannot see this key block; skip their whole tiles
            r0 = tl.minimum(tl.maximum(pid_n * BLOCK_N + k_offset - q_offset, 0), SQ)
            lo = (tl.load(PREFIX + bh * (SQ + 1) + r0) // BLOCK_M) * BLOCK_M
        else:
            lo = 0
        for start_m in range(lo, n_act, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rmask = offs_m < n_act
            rows = tl.load(ROWS + bh * SQ + offs_m, mask=rmask, other=0)
            if IDX64:
                rows = rows.to(tl.int64)
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
            p = tl.exp2(s - lse2[:, None])
            if VARLEN:  # the block may span documents: always mask
                seg_lo = tl.load(SEG + rows, mask=rmask, other=0)
                seg_hi = tl.load(SEG + SQ + rows, mask=rmask, other=0)
                p = tl.where(doc_visible(offs_n, nmask, seg_lo, seg_hi, rows, CAUSAL), p, 0.0)
            else:
                needs = tail  # the mask only where it can matter (tail, diagonal)
                if CAUSAL:
                    needs = needs | (kmax > tl.min(tl.where(rmask, rows + q_offset, kmax)))
                if needs:
                    valid = nmask[None, :]
                    if CAUSAL:
                        valid = valid & (kpos[None, :] <= (rows + q_offset)[:, None])
                    p = tl.where(valid, p, 0.0)
            dv += tl.dot(tl.trans(p.to(da.dtype)), da, input_precision=DOT_PREC)
            dp = tl.dot(da, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - dlt[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kh * stride_dkh + n64 * stride_dkt + ar_n[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + off_b * stride_dvb + off_kh * stride_dvh + n64 * stride_dvt + ar_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd)


def dkdv_row_tile(tune, block_m: int) -> int:
    """Query-row tile of the dk/dv kernel's inner loop: the tuning's override (sm_80, 64 x 128
    half tiles: 32 rows, as 64 spill) if smaller, else the forward's row tile. Any power of two
    >= 16 is exact (the causal start rounds down to a row tile)."""
    return min(block_m, tune.block_m or block_m)


def moh_bwd(do: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            gates: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, act: ActiveRows, *, causal: bool,
            sm_scale: float, q_offset: int, k_offset: int,
            seg: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dgates)`` for upstream ``do [b, sq, h, d]`` and ``dlse [b, h, sq]``.

    Inactive pairs get exactly zero dq and dgates and contribute nothing to dk/dv. ``seg``: as in
    :func:`~seqpar.kernels.moh.triton_fwd.moh_fwd` (varlen).
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    o = o if o.stride(-1) == 1 else o.contiguous()  # may be a CP-merged fp32 output
    block_m, block_n, block_d = block_sizes(d, q.dtype)
    # dgates, delta and the backward lse of the active rows only (inactive: dgates 0, rest unread)
    dgates = torch.zeros(b, sq, h, dtype=gates.dtype, device=gates.device)
    delta = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    lse_bwd = torch.empty_like(delta)
    idx64 = needs_idx64(q, do, o, gates)
    grid = grids(b, sq, sk, h, hkv, d, q.dtype)
    launch(_moh_bwd_preprocess_kernel, grid["preprocess"], (
        o, do, gates, lse, dlse, dgates, delta, lse_bwd, act.rows, act.counts,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        gates.stride(0), gates.stride(1), gates.stride(2), *dgates.stride(), dlse.stride(0), dlse.stride(1), dlse.stride(2),
        sq, h,
    ), dict(D=d, BLOCK_M=block_m, BLOCK_D=block_d, IDX64=idx64), default=W4S3, space=(W4S3,), key=(),
        device=q.device, tunable=False)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    counter = active_counter()
    cnt = torch.zeros(1, dtype=torch.int32, device=q.device)
    common = dict(IDX64=idx64, D=d, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  UPCAST=upcast_dots(q.dtype), DOT_PREC=dot_precision(q.dtype), VARLEN=seg is not None)
    seg_arg = cnt if seg is None else seg  # any int32 tensor when not varlen (never read)
    strides = (q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               gates.stride(0), gates.stride(1), gates.stride(2),
               do.stride(0), do.stride(1), do.stride(2))
    tune = attention_tuning("dq", block_m, d, q.dtype, q.device, op="moh")
    launch(_moh_bwd_dq_kernel, grid["dq"], (
        q, k, v, gates, do, lse_bwd, delta, dq, act.rows, act.counts, cnt, seg_arg,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        sq, sk, h, h // hkv, sm_scale, q_offset, k_offset,
    ), dict(COUNT=counter is not None, **common), default=tune.default, space=tune.space, key=TUNE_KEY,
        device=q.device, tunable=counter is None)
    tune = attention_tuning("dkdv", block_n, d, q.dtype, q.device, op="moh")
    launch(_moh_bwd_dkdv_kernel, grid["dkdv"], (
        q, k, v, gates, do, lse_bwd, delta, dk, dv, act.rows, act.counts, act.prefix, seg_arg,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        sq, sk, h, hkv, h // hkv, sm_scale, q_offset, k_offset,
    ), {**common, "BLOCK_M": dkdv_row_tile(tune, block_m)}, default=tune.default, space=tune.space,
        key=TUNE_KEY, device=q.device)
    if counter is not None:
        counter.backward += int(cnt.item())
    return dq, dk, dv, dgates
