"""Triton backward launchers for Lightning attention (no autograd here).

With ``S`` the state before a chunk and ``dS`` the gradient of the state at the chunk's end
(everything later in the document, seeded by the gradient flowing into ``final_state``):

* the reverse state pass (``state_pass(reverse=True)``: chunk-local ``(λ^{i+1} q_i)ᵀ do_i`` in
  parallel over chunks, then the scan ``dS_prev = λ^L dS + local`` from the last chunk), stored
  per chunk; what remains after the first chunk is ``d initial_state``.
* ``_dv_kernel`` / ``_dqk_kernel`` (parallel over chunks and dv / dk tiles), with ``A = Q Kᵀ``,
  ``dA = dO Vᵀ``, ``D[i,j] = λ^{i-j}``::

      dq = (dA ⊙ D) K   + λ^{i+1}   dO Sᵀ          (forward-direction states)
      dk = (dA ⊙ D)ᵀ Q  + λ^{L-1-j} V dSᵀ          (reverse-direction states)
      dv = (A ⊙ D)ᵀ dO  + λ^{L-1-j} K dS

With GQA, dk/dv are produced per query head in fp32 and summed over the group afterwards. The
forward's per-chunk states are recomputed here rather than kept from the forward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._plan import ChunkPlan
from .._tuning import launch, lightning_tuning
from .._grid import unfold
from .triton_fwd import TUNE_KEY, _mm, chunk_states, dot_modes, grids, state_pass, tile


@triton.jit
def _dv_kernel(q_ptr, k_ptr, do_ptr, slope_ptr, dhbuf_ptr, dv_ptr, cu_ptr, chidx_ptr, num_chunks,
               H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, SMODE: tl.constexpr):
    # dv = (A ⊙ D)ᵀ dO + λ^{L-1-j} K dS for one dv tile of one chunk (per query head)
    i_v, i_t, head = unfold(tl.program_id(0), tl.cdiv(DV, BV), num_chunks)  # 1-D grid (triton_fwd.grids)
    kvh = head // (H // HKV)
    doc = tl.load(chidx_ptr + i_t * 2)
    c = tl.load(chidx_ptr + i_t * 2 + 1)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    start = bos + c * C
    L = tl.minimum(eos - start, C)
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = q_ptr.dtype.element_ty

    o_c = tl.arange(0, C)
    m_r = start + o_c < eos
    # 64-bit scalar token base (T * H * D can pass 2^31), 32-bit offsets inside the chunk:
    # per-element 64-bit offsets cost two registers per element (spills on sm_80)
    tok = start.to(tl.int64)
    o_qh = o_c[:, None] * (H * DK)
    o_kh = o_c[:, None] * (HKV * DK)
    o_vh = o_c[:, None] * (H * DV)
    q_base = q_ptr + (tok * H + head) * DK
    k_base = k_ptr + (tok * HKV + kvh) * DK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    s_base = (i_t.to(tl.int64) * H + head) * DK * DV
    b_a = tl.zeros([C, C], dtype=tl.float32)
    b_kdh = tl.zeros([C, BV], dtype=tl.float32)
    for kk in range(0, DK, BK):
        o_k = kk + tl.arange(0, BK)
        m_k = o_k < DK
        b_q = tl.load(q_base + o_qh + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k_base + o_kh + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_dh = tl.load(dhbuf_ptr + s_base + o_k[:, None] * DV + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_a += _mm(b_q, tl.trans(b_k), DT, MODE)
        b_kdh += _mm(b_k, b_dh, DT, SMODE)
    dist = o_c[:, None] - o_c[None, :]
    b_a = tl.where(dist >= 0, b_a * tl.exp(-slope * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    k_decay = tl.where(m_r, tl.exp(-slope * tl.maximum(L - 1 - o_c, 0).to(tl.float32)), 0.0)
    m_rv = m_r[:, None] & m_v[None, :]
    b_do = tl.load(do_ptr + (tok * H + head) * DV + o_vh + o_v[None, :], mask=m_rv, other=0.0)
    b_dv = _mm(tl.trans(b_a), b_do, DT, MODE) + b_kdh * k_decay[:, None]
    tl.store(dv_ptr + (tok * H + head) * DV + o_vh + o_v[None, :], b_dv, mask=m_rv)


@triton.jit
def _dqk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, slope_ptr, hbuf_ptr, dhbuf_ptr, dq_ptr, dk_ptr,
                cu_ptr, chidx_ptr, num_chunks,
                H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr, SMODE: tl.constexpr):
    # dq = (dA ⊙ D) K + λ^{i+1} dO Sᵀ and dk = (dA ⊙ D)ᵀ Q + λ^{L-1-j} V dSᵀ for one dk tile
    i_k, i_t, head = unfold(tl.program_id(0), tl.cdiv(DK, BK), num_chunks)  # 1-D grid (triton_fwd.grids)
    kvh = head // (H // HKV)
    doc = tl.load(chidx_ptr + i_t * 2)
    c = tl.load(chidx_ptr + i_t * 2 + 1)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    start = bos + c * C
    L = tl.minimum(eos - start, C)
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = q_ptr.dtype.element_ty

    o_c = tl.arange(0, C)
    m_r = start + o_c < eos
    tok = start.to(tl.int64)  # 64-bit scalar bases, 32-bit chunk offsets (see _dv_kernel)
    o_qh = o_c[:, None] * (H * DK)
    o_kh = o_c[:, None] * (HKV * DK)
    o_vh = o_c[:, None] * (H * DV)
    o_kvh = o_c[:, None] * (HKV * DV)
    v_base = v_ptr + (tok * HKV + kvh) * DV
    do_base = do_ptr + (tok * H + head) * DV
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < DK
    s_base = (i_t.to(tl.int64) * H + head) * DK * DV
    b_da = tl.zeros([C, C], dtype=tl.float32)
    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    for vv in range(0, DV, BV):
        o_v = vv + tl.arange(0, BV)
        m_v = o_v < DV
        m_rv = m_r[:, None] & m_v[None, :]
        b_v = tl.load(v_base + o_kvh + o_v[None, :], mask=m_rv, other=0.0)
        b_do = tl.load(do_base + o_vh + o_v[None, :], mask=m_rv, other=0.0)
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(hbuf_ptr + s_base + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
        b_dh = tl.load(dhbuf_ptr + s_base + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
        b_da += _mm(b_do, tl.trans(b_v), DT, MODE)
        b_dq += _mm(b_do, tl.trans(b_h), DT, SMODE)
        b_dk += _mm(b_v, tl.trans(b_dh), DT, SMODE)
    dist = o_c[:, None] - o_c[None, :]
    b_da = tl.where(dist >= 0, b_da * tl.exp(-slope * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    k_decay = tl.where(m_r, tl.exp(-slope * tl.maximum(L - 1 - o_c, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-slope * (o_c + 1).to(tl.float32))
    m_rk = m_r[:, None] & m_k[None, :]
    b_q = tl.load(q_ptr + (tok * H + head) * DK + o_qh + o_k[None, :], mask=m_rk, other=0.0)
    b_k = tl.load(k_ptr + (tok * HKV + kvh) * DK + o_kh + o_k[None, :], mask=m_rk, other=0.0)
    b_dq = _mm(b_da, b_k, DT, MODE) + b_dq * q_decay[:, None]
    b_dk = _mm(tl.trans(b_da), b_q, DT, MODE) + b_dk * k_decay[:, None]
    tl.store(dq_ptr + (tok * H + head) * DK + o_qh + o_k[None, :], b_dq.to(dq_ptr.dtype.element_ty), mask=m_rk)
    tl.store(dk_ptr + (tok * H + head) * DK + o_qh + o_k[None, :], b_dk, mask=m_rk)


def lightning_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                  h0: Optional[torch.Tensor], do: torch.Tensor, dht: Optional[torch.Tensor],
                  plan: ChunkPlan, need_dh0: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Flat inputs as :func:`lightning_fwd`, ``do [T, h, dv]``, ``dht`` fp32 ``[docs, h, dk, dv]``
    or None. Returns (dq, dk, dv in the input dtype, d initial_state fp32 or None)."""
    T, h, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    mode, smode = dot_modes(q.dtype)
    hbuf, _ = chunk_states(k, v, slope, h0, plan, h, store_final=False)  # recompute, not stored
    # reverse state pass: chunk-local (λ^{i+1} q_i)ᵀ do_i in parallel, then the scan from the end
    dhbuf, dh0 = state_pass(q, do, slope, dht, plan, h, hbuf.dtype, reverse=True, store_final=need_dh0)
    bk, bv = tile(dk, q.dtype), tile(dv, q.dtype)
    dq = torch.empty_like(q)
    dk_h = torch.empty(T, h, dk, dtype=torch.float32, device=q.device)
    dv_h = torch.empty(T, h, dv, dtype=torch.float32, device=q.device)
    meta = dict(H=h, HKV=hkv, DK=dk, DV=dv, C=plan.chunk_size, BK=bk, BV=bv, MODE=mode, SMODE=smode)
    t = lightning_tuning("chunk", q.device)
    tune = dict(default=t.default, space=t.space, key=TUNE_KEY, device=q.device)
    grid = grids(plan.num_chunks, plan.num_docs, h, dk, dv, q.dtype)
    launch(_dv_kernel, grid["dv"],
           (q, k, do, slope, dhbuf, dv_h, plan.cu, plan.chunk_indices, plan.num_chunks), meta, **tune)
    launch(_dqk_kernel, grid["dqk"],
           (q, k, v, do, slope, hbuf, dhbuf, dq, dk_h, plan.cu, plan.chunk_indices, plan.num_chunks), meta, **tune)
    g = h // hkv
    dk_out = dk_h.view(T, hkv, g, dk).sum(2).to(k.dtype)
    dv_out = dv_h.view(T, hkv, g, dv).sum(2).to(v.dtype)
    return dq, dk_out, dv_out, dh0
