"""Triton forward launchers for Lightning attention (Lightning-2 tiling, no autograd here).

Two kernels, as in flash-linear-attention's chunked ops:

* ``_state_kernel`` walks a document's chunks in order and stores the fp32 state *before* each
  chunk (``KV ← λ^L KV + (λ^{L-1-j} k_j)ᵀ v_j``) plus the final state; parallel over
  (dk tile, dv tile, document x head).
* ``_output_kernel`` is parallel over chunks: intra-block ``((Q Kᵀ) ⊙ D) V`` plus inter-block
  ``Λ Q KV`` with ``Λ = diag(λ^{i+1})``.

All decays are ``exp(-slope * distance)`` with ``distance >= 0`` (log space), so no slope or
length overflows. Inputs are flat ``[tokens, heads, dim]`` (see ``_plan.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import interpret_enabled
from ._plan import ChunkPlan


# Chunk-parallel kernels hold two [C, C] / [C, 64] fp32 accumulators: 8 warps keep them in
# registers on sm_90 (4 warps spill, checked with an offline sm_90 compile), 2 stages bound smem.
NUM_WARPS = 8
NUM_STAGES = 2


@triton.jit
def _mm(a, b, DT: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: operands in the input dtype DT, fp32 accumulation (the fast path);
    # 1: fp32 operands, exact products (fp32 inputs; bf16 under the interpreter, whose bf16
    #    tl.dot is wrong); 2: fp32 operands in tf32 (fp16 inputs x fp32 states, which may
    #    exceed fp16's range of 65504).
    if MODE == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == 2:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        out = tl.dot(a.to(DT), b.to(DT))
    return out


def dot_modes(dtype: torch.dtype) -> tuple[int, int]:
    """(MODE for products of inputs, SMODE for products with an fp32 state or state gradient)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpret_enabled()):
        return 1, 1
    return 0, (2 if dtype == torch.float16 else 0)


def snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-chunk state snapshots: the input dtype when the products that read them
    round them to it anyway (mode 0, bf16 on GPU: half the memory, same result), else fp32. The
    running state and final_state are always fp32."""
    return dtype if dot_modes(dtype)[1] == 0 else torch.float32


def tile(d: int, dtype: torch.dtype) -> int:
    """Head-dim tile: the dim padded to a power of two >= 16 (tl.dot's minimum), at most 64, or
    32 for fp16, whose fp32 state operands (mode 2) would otherwise spill registers on sm_90."""
    return min(32 if dot_modes(dtype)[1] == 2 else 64, max(16, triton.next_power_of_2(d)))


@triton.jit
def _state_kernel(k_ptr, v_ptr, slope_ptr, h0_ptr, hbuf_ptr, ht_ptr, cu_ptr, choff_ptr,
                  H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, MODE: tl.constexpr):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    doc, head = i_nh // H, i_nh % H
    kvh = head // (H // HKV)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    first = tl.load(choff_ptr + doc)
    nt = tl.cdiv(eos - bos, C)
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = k_ptr.dtype.element_ty

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_kv = (o_k[:, None] < DK) & (o_v[None, :] < DV)
    s_off = o_k[:, None] * DV + o_v[None, :]
    if HAS_H0:
        b_s = tl.load(h0_ptr + (doc.to(tl.int64) * H + head) * DK * DV + s_off, mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(nt):
        tl.store(hbuf_ptr + ((first + c).to(tl.int64) * H + head) * DK * DV + s_off,
                 b_s.to(hbuf_ptr.dtype.element_ty), mask=m_kv)
        start = bos + c * C
        rows = (start + o_c).to(tl.int64)  # 64-bit offsets: T * H * D can pass 2^31
        m_r = rows < eos
        b_k = tl.load(k_ptr + (rows[:, None] * HKV + kvh) * DK + o_k[None, :],
                      mask=m_r[:, None] & (o_k[None, :] < DK), other=0.0)
        b_v = tl.load(v_ptr + (rows[:, None] * HKV + kvh) * DV + o_v[None, :],
                      mask=m_r[:, None] & (o_v[None, :] < DV), other=0.0)
        L = tl.minimum(eos - start, C)
        k_decay = tl.where(m_r, tl.exp(-slope * tl.maximum(L - 1 - o_c, 0).to(tl.float32)), 0.0)
        b_kd = b_k.to(tl.float32) * k_decay[:, None]
        b_s = b_s * tl.exp(-slope * L.to(tl.float32)) + _mm(tl.trans(b_kd), b_v, DT, MODE)
    if STORE_HT:
        tl.store(ht_ptr + (doc.to(tl.int64) * H + head) * DK * DV + s_off, b_s, mask=m_kv)


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, hbuf_ptr, o_ptr, cu_ptr, chidx_ptr,
                   H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   MODE: tl.constexpr, SMODE: tl.constexpr):
    i_v, i_t, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = head // (H // HKV)
    doc = tl.load(chidx_ptr + i_t * 2)
    c = tl.load(chidx_ptr + i_t * 2 + 1)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    start = bos + c * C
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = q_ptr.dtype.element_ty

    o_c = tl.arange(0, C)
    rows = (start + o_c).to(tl.int64)  # 64-bit offsets: T * H * D can pass 2^31
    m_r = rows < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    b_a = tl.zeros([C, C], dtype=tl.float32)
    b_inter = tl.zeros([C, BV], dtype=tl.float32)
    for kk in range(0, DK, BK):
        o_k = kk + tl.arange(0, BK)
        m_k = o_k < DK
        b_q = tl.load(q_ptr + (rows[:, None] * H + head) * DK + o_k[None, :],
                      mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k_ptr + (rows[:, None] * HKV + kvh) * DK + o_k[None, :],
                      mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_h = tl.load(hbuf_ptr + (i_t.to(tl.int64) * H + head) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_a += _mm(b_q, tl.trans(b_k), DT, MODE)
        b_inter += _mm(b_q, b_h, DT, SMODE)
    dist = o_c[:, None] - o_c[None, :]
    b_a = tl.where(dist >= 0, b_a * tl.exp(-slope * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    b_v = tl.load(v_ptr + (rows[:, None] * HKV + kvh) * DV + o_v[None, :],
                  mask=m_r[:, None] & m_v[None, :], other=0.0)
    q_decay = tl.exp(-slope * (o_c + 1).to(tl.float32))
    b_o = _mm(b_a, b_v, DT, MODE) + b_inter * q_decay[:, None]
    tl.store(o_ptr + (rows[:, None] * H + head) * DV + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])


def chunk_states(k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, h0: Optional[torch.Tensor],
                 plan: ChunkPlan, num_heads: int, store_final: bool = True
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """k/v flat ``[T, hkv, d]``. Returns (states before each chunk ``[chunks, h, dk, dv]``,
    final states fp32 ``[docs, h, dk, dv]`` or None)."""
    _, hkv, dk = k.shape
    dv = v.shape[-1]
    hbuf = torch.empty(plan.num_chunks, num_heads, dk, dv, dtype=snapshot_dtype(k.dtype), device=k.device)
    ht = torch.empty(plan.num_docs, num_heads, dk, dv, dtype=torch.float32, device=k.device) if store_final else None
    bk, bv = tile(dk, k.dtype), tile(dv, k.dtype)
    grid = (triton.cdiv(dk, bk), triton.cdiv(dv, bv), plan.num_docs * num_heads)
    _state_kernel[grid](k, v, slope, h0 if h0 is not None else hbuf, hbuf, ht if ht is not None else hbuf,
                        plan.cu, plan.chunk_offsets, H=num_heads, HKV=hkv, DK=dk, DV=dv,
                        C=plan.chunk_size, BK=bk, BV=bv, HAS_H0=h0 is not None, STORE_HT=store_final,
                        MODE=dot_modes(k.dtype)[0])
    return hbuf, ht


def lightning_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                  h0: Optional[torch.Tensor], plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q flat ``[T, h, dk]``, k ``[T, hkv, dk]``, v ``[T, hkv, dv]`` (contiguous), slope fp32
    ``[h]``, h0 fp32 ``[docs, h, dk, dv]`` or None. Returns (o ``[T, h, dv]``, final fp32)."""
    T, h, dk = q.shape
    dv = v.shape[-1]
    hbuf, ht = chunk_states(k, v, slope, h0, plan, h)
    o = torch.empty(T, h, dv, dtype=q.dtype, device=q.device)
    bk, bv = tile(dk, q.dtype), tile(dv, q.dtype)
    grid = (triton.cdiv(dv, bv), plan.num_chunks, h)
    mode, smode = dot_modes(q.dtype)
    _output_kernel[grid](q, k, v, slope, hbuf, o, plan.cu, plan.chunk_indices, H=h, HKV=k.shape[1],
                         DK=dk, DV=dv, C=plan.chunk_size, BK=bk, BV=bv, MODE=mode, SMODE=smode,
                         num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return o, ht
