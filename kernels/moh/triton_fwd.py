"""Triton forward of MoH attention over tiles of ACTIVE query rows (launcher returns tensors).

Program (m, bh) takes rows ``m*BLOCK_M ...`` of head bh's active-row list, gathers those query
rows, and runs an online softmax over the keys its rows can see (causal: up to the largest row
position of the tile). Inactive rows are never loaded; their output stays 0 and their LSE -inf.
Varlen (``VARLEN``): ``SEG [2, sq]`` holds each token's document start and end; a row sees only
the keys of its document, and the key loop runs from the first document start of the tile's rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import interpret_enabled
from .._grid import check_grid
from .counter import active_counter
from .rows import ActiveRows
from .._tuning import attention_tuning, launch

# what decides the best config (dtypes are added by triton.autotune)
TUNE_KEY = ("D", "BLOCK_M", "CAUSAL", "GROUP")

def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tl.dot needs tiles >= 16; arange sizes are powers of two."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret_enabled():
        return 32, 32, block_d  # the interpreter pays per program and per loop step: few, big tiles
    # shared memory: 64x64 tiles of 16-bit data take <= 75 KB at d = 128; fp32 tiles or d > 128
    # use 32x32 (<= 100 KB), within sm_80 / sm_90 limits
    small = block_d > 128 or dtype == torch.float32
    return (32, 32, block_d) if small else (64, 64, block_d)


def needs_idx64(*tensors: torch.Tensor) -> bool:
    """True when a row-gathered offset inside one batch element (row * stride(1) + head *
    stride(2) + dim) can pass 2^31: the kernels then use 64-bit row offsets (more registers)."""
    return any((t.shape[1] * t.stride(1) + t.shape[2] * t.stride(2)) >= 2 ** 31 for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would default to tf32 on GPU, which is less accurate than the fp32 reference
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    # the interpreter's tl.dot returns garbage on bf16 operands: cast tiles to fp32 first
    return interpret_enabled() and dtype == torch.bfloat16


@triton.jit
def row_program(SQ, BLOCK_M: tl.constexpr):
    """(row tile, batch x head) of this program: the grid is 1-D, ``tiles x (batch * heads)`` folded
    into axis 0 (CUDA allows 65535 programs on axes 1 and 2), row tiles of one head adjacent."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(SQ, BLOCK_M)
    return pid % tiles, pid // tiles


def grids(batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, head_dim: int,
          dtype: torch.dtype) -> dict:
    """Launch grids of the MoH kernels (forward, backward preprocess, dq, dk/dv), 1-D (see
    :func:`row_program`), checked against CUDA's limits; the launchers use exactly these."""
    block_m, block_n, _ = block_sizes(head_dim, dtype)
    rows = triton.cdiv(seq_q, block_m) * batch * heads
    return {
        "fwd": check_grid("moh fwd", (rows,)),
        "preprocess": check_grid("moh bwd preprocess", (rows,)),
        "dq": check_grid("moh bwd dq", (rows,)),
        "dkdv": check_grid("moh bwd dk/dv", (triton.cdiv(seq_k, block_n) * batch * kv_heads,)),
    }


@triton.jit
def doc_visible(offs_n, nmask, seg_lo, seg_hi, rows, CAUSAL: tl.constexpr):
    """Varlen mask ``[rows, keys]``: the key lies in the row's document ``[seg_lo, seg_hi)`` (and at
    or before the row when causal); offsets are 0 with varlen."""
    valid = nmask[None, :] & (offs_n[None, :] >= seg_lo[:, None]) & (offs_n[None, :] < seg_hi[:, None])
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= rows[:, None])
    return valid


@triton.jit
def _moh_fwd_kernel(
    Q, K, V, G, O, LSE, ROWS, COUNTS, CNT, SEG,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_ob, stride_ot, stride_oh,
    SQ, SK, H, GROUP, sm_scale, q_offset, k_offset,
    D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, COUNT: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_m, bh = row_program(SQ, BLOCK_M)
    n_act = tl.load(COUNTS + bh)
    if pid_m * BLOCK_M >= n_act:
        return  # this head has fewer active rows than this tile's start
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
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = rows + q_offset
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    if VARLEN:  # offsets are 0: a row sees the keys [doc start, doc end) of its document
        seg_lo = tl.load(SEG + rows, mask=rmask, other=0)
        seg_hi = tl.load(SEG + SQ + rows, mask=rmask, other=0)
        lo = tl.min(tl.where(rmask, seg_lo, SK))
    if CAUSAL:
        last = tl.max(tl.where(rmask, qpos, -1))
        first = tl.min(tl.where(rmask, qpos, last))  # rows are ascending; any masked row is ignored
        hi = tl.minimum(tl.maximum(last - k_offset + 1, 0), SK)
    elif VARLEN:
        hi = tl.max(tl.where(rmask, seg_hi, 0))
    else:
        hi = SK
    k_base = K + off_b * stride_kb + off_kh * stride_kh
    v_base = V + off_b * stride_vb + off_kh * stride_vh
    ar_n = tl.arange(0, BLOCK_N)
    # loop-invariant 32-bit tile offsets; the 64-bit part is one scalar per step
    k_off = ar_n[:, None] * stride_kt + offs_d[None, :]
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
        if VARLEN:  # a tile's rows may span documents: always mask
            s = tl.where(doc_visible(offs_n, nmask, seg_lo, seg_hi, rows, CAUSAL), s, float("-inf"))
        else:
            # only the kv tail tile and tiles past the tile's first row position need the mask
            needs = start_n + BLOCK_N > SK
            if CAUSAL:
                needs = needs | (start_n + BLOCK_N - 1 + k_offset > first)
            if needs:
                valid = nmask[None, :]
                if CAUSAL:
                    valid = valid & ((offs_n + k_offset)[None, :] <= qpos[:, None])
                s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    gate = tl.load(G + off_b * stride_gb + rows * stride_gt + off_h * stride_gh, mask=rmask, other=0.0)
    o = acc / l_safe[:, None] * gate.to(tl.float32)[:, None]
    tl.store(O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * SQ + rows, lse, mask=rmask)
    if COUNT:
        tl.atomic_add(CNT, tl.sum(rmask.to(tl.int32), 0))


def moh_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, act: ActiveRows, *,
            causal: bool, sm_scale: float, q_offset: int, k_offset: int,
            seg: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``o [b, sq, h, d]`` (zeros at inactive pairs) and fp32 ``lse [b, h, sq]`` (-inf there).

    Expects the last dim of q/k/v contiguous (the public entry ensures it). ``seg``: int32 ``[2, sq]``
    document start / end of every token (varlen, batch 1, offsets 0), or None.
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    o = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((b, h, sq), float("-inf"), device=q.device, dtype=torch.float32)
    block_m, block_n, block_d = block_sizes(d, q.dtype)
    counter = active_counter()
    cnt = torch.zeros(1, dtype=torch.int32, device=q.device)
    grid = grids(b, sq, sk, h, hkv, d, q.dtype)["fwd"]
    tune = attention_tuning("fwd", block_m, d, q.dtype, q.device, op="moh")
    launch(_moh_fwd_kernel, grid, (
        q, k, v, gates, o, lse, act.rows, act.counts, cnt, cnt if seg is None else seg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        gates.stride(0), gates.stride(1), gates.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        sq, sk, h, h // hkv, sm_scale, q_offset, k_offset,
    ), dict(IDX64=needs_idx64(q, o, gates), D=d, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            UPCAST=upcast_dots(q.dtype), COUNT=counter is not None, DOT_PREC=dot_precision(q.dtype),
            VARLEN=seg is not None),
        default=tune.default, space=tune.space, key=TUNE_KEY, device=q.device, tunable=counter is None)
    if counter is not None:
        counter.forward += int(cnt.item())
    return o, lse
