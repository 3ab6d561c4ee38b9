"""Triton forward launchers for Lightning attention (Lightning-2 tiling, no autograd here).

Three kernels:

* the state pass: ``_chunk_state_kernel`` computes every chunk's own contribution
  ``Σ_j λ^{L-1-j} k_jᵀ v_j`` in parallel over (dk tile, dv tile, chunk x head), then
  ``_state_scan_kernel`` runs ``KV ← λ^L KV + local`` over a document's chunks, parallel over
  blocks of the state and (document x head), storing the state *before* each chunk (fp32 or the
  snapshot dtype) and the fp32 final state (LASP-2's intra-rank form; FLA's ``chunk_fwd_h``
  walks the chunks inside one program per (tile, head) instead, which leaves most SMs idle).
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
from .._grid import check_grid, unfold
from .._tuning import LaunchConfig, launch, lightning_tuning
from ._plan import ChunkPlan


# Launch configs per GPU target: seqpar.kernels._tuning.lightning_tuning ("chunk": the output,
# dv, dq/dk kernels; "state": the chunk-local state product). Autotuned over the space on CUDA,
# keyed on the dims and the GQA layout.
TUNE_KEY = ("DK", "DV", "H", "HKV")


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
def _chunk_state_kernel(a_ptr, b_ptr, slope_ptr, loc_ptr, cu_ptr, chidx_ptr,
                        H: tl.constexpr, HA: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        Q_DECAY: tl.constexpr, MODE: tl.constexpr):
    # One chunk's own contribution to the state, parallel over (dk tile, dv tile, chunk x head):
    #   forward  (a, b) = (k, v):  loc = Σ_j λ^{L-1-j} k_jᵀ v_j   (decay to the chunk's end)
    #   backward (a, b) = (q, do): loc = Σ_i λ^{i+1}   q_iᵀ do_i  (decay to the chunk's start)
    # ``a``/``b`` have HA heads (kv heads for k/v, query heads for q/do); the decay is per query head.
    # (dk tile, dv tile, chunk x head) folded into axis 0 (see grids)
    i_k, i_v, i_th = unfold(tl.program_id(0), tl.cdiv(DK, BK), tl.cdiv(DV, BV))
    i_t, head = i_th // H, i_th % H
    ah = head // (H // HA)
    doc = tl.load(chidx_ptr + i_t * 2)
    c = tl.load(chidx_ptr + i_t * 2 + 1)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    start = bos + c * C
    L = tl.minimum(eos - start, C)
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = a_ptr.dtype.element_ty

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_r = start + o_c < eos
    # 64-bit scalar token base (T * H * D can pass 2^31), 32-bit offsets inside the chunk:
    # per-element 64-bit offsets cost two registers per element
    tok = start.to(tl.int64)
    b_a = tl.load(a_ptr + (tok * HA + ah) * DK + o_c[:, None] * (HA * DK) + o_k[None, :],
                  mask=m_r[:, None] & (o_k[None, :] < DK), other=0.0)
    b_b = tl.load(b_ptr + (tok * HA + ah) * DV + o_c[:, None] * (HA * DV) + o_v[None, :],
                  mask=m_r[:, None] & (o_v[None, :] < DV), other=0.0)
    if Q_DECAY:
        w = tl.exp(-slope * (o_c + 1).to(tl.float32))
    else:
        w = tl.where(m_r, tl.exp(-slope * tl.maximum(L - 1 - o_c, 0).to(tl.float32)), 0.0)
    b_aw = b_a.to(tl.float32) * w[:, None]
    loc = _mm(tl.trans(b_aw), b_b, DT, MODE)
    m_kv = (o_k[:, None] < DK) & (o_v[None, :] < DV)
    tl.store(loc_ptr + (i_t.to(tl.int64) * H + head) * DK * DV + o_k[:, None] * DV + o_v[None, :], loc, mask=m_kv)


@triton.jit
def _state_scan_kernel(loc_ptr, slope_ptr, s0_ptr, sbuf_ptr, sfin_ptr, cu_ptr, choff_ptr,
                       H: tl.constexpr, DKV: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_S0: tl.constexpr, STORE_FIN: tl.constexpr, REVERSE: tl.constexpr):
    # The only sequential part, elementwise over a BLOCK of the flattened [dk, dv] state:
    #   forward: S_{c+1} = λ^{L_c} S_c + loc_c, storing S_c (the state before chunk c);
    #   backward (REVERSE): dS_{c-1} = λ^{L_c} dS_c + loc_c from the last chunk, storing dS_c.
    # Parallel over (state block, document x head), so the grid is dk*dv/BLOCK times wider than a
    # per-head walk; each step is one fused multiply-add on BLOCK fp32 values.
    pid = tl.program_id(0)  # (state block, document x head) folded into axis 0
    i_b, i_nh = pid % tl.cdiv(DKV, BLOCK), pid // tl.cdiv(DKV, BLOCK)
    doc, head = i_nh // H, i_nh % H
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    first = tl.load(choff_ptr + doc)
    nt = tl.cdiv(eos - bos, C)
    slope = tl.load(slope_ptr + head).to(tl.float32)
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < DKV
    if HAS_S0:
        s = tl.load(s0_ptr + (doc.to(tl.int64) * H + head) * DKV + o, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for cc in range(nt):
        if REVERSE:
            c = nt - 1 - cc
        else:
            c = cc
        L = tl.minimum(eos - (bos + c * C), C)
        off = ((first + c).to(tl.int64) * H + head) * DKV + o
        tl.store(sbuf_ptr + off, s.to(sbuf_ptr.dtype.element_ty), mask=m)
        s = s * tl.exp(-slope * L.to(tl.float32)) + tl.load(loc_ptr + off, mask=m, other=0.0)
    if STORE_FIN:
        tl.store(sfin_ptr + (doc.to(tl.int64) * H + head) * DKV + o, s, mask=m)


SCAN_BLOCK = 256  # state elements per scan program: d=64 x 12 heads still gives 192 programs


def state_pass(a: torch.Tensor, b: torch.Tensor, slope: torch.Tensor, s0: Optional[torch.Tensor],
               plan: ChunkPlan, num_heads: int, out_dtype: torch.dtype, *, reverse: bool,
               store_final: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunk-local states (parallel over chunks) then the scan over chunks (parallel over state
    blocks). Forward: ``(a, b) = (k, v)``, returns (state before each chunk, final state).
    Backward (``reverse``): ``(a, b) = (q, do)``, ``s0`` = d final_state, returns (gradient of the
    state at each chunk's end, d initial_state)."""
    _, ha, dk = a.shape
    dv = b.shape[-1]
    loc = torch.empty(plan.num_chunks, num_heads, dk, dv, dtype=torch.float32, device=a.device)
    bk, bv = state_tile(dk), state_tile(dv)
    st = lightning_tuning("state", a.device)
    grid = grids(plan.num_chunks, plan.num_docs, num_heads, dk, dv, a.dtype)
    launch(_chunk_state_kernel, grid["chunk_state"],
           (a, b, slope, loc, plan.cu, plan.chunk_indices),
           dict(H=num_heads, HA=ha, DK=dk, DV=dv, C=plan.chunk_size, BK=bk, BV=bv, Q_DECAY=reverse,
                MODE=dot_modes(a.dtype)[0]),
           default=st.default, space=st.space, key=("DK", "DV", "Q_DECAY"), device=a.device)
    sbuf = torch.empty(plan.num_chunks, num_heads, dk, dv, dtype=out_dtype, device=a.device)
    fin = torch.empty(plan.num_docs, num_heads, dk, dv, dtype=torch.float32, device=a.device) if store_final else None
    launch(_state_scan_kernel, grid["state_scan"],
           (loc, slope, s0 if s0 is not None else loc, sbuf, fin if fin is not None else loc, plan.cu,
            plan.chunk_offsets),
           dict(H=num_heads, DKV=dk * dv, C=plan.chunk_size, BLOCK=SCAN_BLOCK, HAS_S0=s0 is not None,
                STORE_FIN=store_final, REVERSE=reverse),
           default=SCAN_CONFIG, space=(SCAN_CONFIG,), key=(), device=a.device, tunable=False)
    return sbuf, fin


SCAN_CONFIG = LaunchConfig(2, 3)  # elementwise fp32 FMAs: 2 warps hold a 256-element block


def grids(num_chunks: int, num_docs: int, heads: int, dk: int, dv: int, dtype: torch.dtype) -> dict:
    """Launch grids of the Lightning kernels, 1-D: every program index (head-dim tiles, chunk or
    document, head) folded into axis 0 (CUDA allows 2^31 - 1 programs there, 65535 on axes 1 and
    2, which ``chunks x heads`` passes at 4.2M tokens x heads). Checked against CUDA's limits; the
    launchers use exactly these. ``chunk`` covers the output, dv and dq/dk kernels."""
    sk, sv = state_tile(dk), state_tile(dv)
    bk, bv = tile(dk, dtype), tile(dv, dtype)
    return {
        "chunk_state": check_grid("lightning chunk-local state",
                                  (triton.cdiv(dk, sk) * triton.cdiv(dv, sv) * num_chunks * heads,)),
        "state_scan": check_grid("lightning state scan", (triton.cdiv(dk * dv, SCAN_BLOCK) * num_docs * heads,)),
        "output": check_grid("lightning output", (triton.cdiv(dv, bv) * num_chunks * heads,)),
        "dv": check_grid("lightning bwd dv", (triton.cdiv(dv, bv) * num_chunks * heads,)),
        "dqk": check_grid("lightning bwd dq/dk", (triton.cdiv(dk, bk) * num_chunks * heads,)),
    }


def state_tile(d: int) -> int:
    """Head-dim tile of the chunk-local state product: 64 (wgmma's M) or the padded dim."""
    return min(64, max(16, triton.next_power_of_2(d)))


@triton.jit
def _output_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, hbuf_ptr, o_ptr, cu_ptr, chidx_ptr, num_chunks,
                   H: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   MODE: tl.constexpr, SMODE: tl.constexpr):
    i_v, i_t, head = unfold(tl.program_id(0), tl.cdiv(DV, BV), num_chunks)  # (dv tile, chunk, head)
    kvh = head // (H // HKV)
    doc = tl.load(chidx_ptr + i_t * 2)
    c = tl.load(chidx_ptr + i_t * 2 + 1)
    bos = tl.load(cu_ptr + doc)
    eos = tl.load(cu_ptr + doc + 1)
    start = bos + c * C
    slope = tl.load(slope_ptr + head).to(tl.float32)
    DT = q_ptr.dtype.element_ty

    o_c = tl.arange(0, C)
    m_r = start + o_c < eos
    tok = start.to(tl.int64)  # 64-bit scalar bases, 32-bit chunk offsets (see _chunk_state_kernel)
    q_base = q_ptr + (tok * H + head) * DK
    k_base = k_ptr + (tok * HKV + kvh) * DK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    b_a = tl.zeros([C, C], dtype=tl.float32)
    b_inter = tl.zeros([C, BV], dtype=tl.float32)
    for kk in range(0, DK, BK):
        o_k = kk + tl.arange(0, BK)
        m_k = o_k < DK
        b_q = tl.load(q_base + o_c[:, None] * (H * DK) + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k_base + o_c[:, None] * (HKV * DK) + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                      other=0.0)
        b_h = tl.load(hbuf_ptr + (i_t.to(tl.int64) * H + head) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_a += _mm(b_q, tl.trans(b_k), DT, MODE)
        b_inter += _mm(b_q, b_h, DT, SMODE)
    dist = o_c[:, None] - o_c[None, :]
    b_a = tl.where(dist >= 0, b_a * tl.exp(-slope * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    b_v = tl.load(v_ptr + (tok * HKV + kvh) * DV + o_c[:, None] * (HKV * DV) + o_v[None, :],
                  mask=m_r[:, None] & m_v[None, :], other=0.0)
    q_decay = tl.exp(-slope * (o_c + 1).to(tl.float32))
    b_o = _mm(b_a, b_v, DT, MODE) + b_inter * q_decay[:, None]
    tl.store(o_ptr + (tok * H + head) * DV + o_c[:, None] * (H * DV) + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])


def chunk_states(k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, h0: Optional[torch.Tensor],
                 plan: ChunkPlan, num_heads: int, store_final: bool = True
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """k/v flat ``[T, hkv, d]``. Returns (states before each chunk ``[chunks, h, dk, dv]``,
    final states fp32 ``[docs, h, dk, dv]`` or None)."""
    return state_pass(k, v, slope, h0, plan, num_heads, snapshot_dtype(k.dtype), reverse=False,
                      store_final=store_final)


def lightning_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                  h0: Optional[torch.Tensor], plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """q flat ``[T, h, dk]``, k ``[T, hkv, dk]``, v ``[T, hkv, dv]`` (contiguous), slope fp32
    ``[h]``, h0 fp32 ``[docs, h, dk, dv]`` or None. Returns (o ``[T, h, dv]``, final fp32)."""
    T, h, dk = q.shape
    dv = v.shape[-1]
    hbuf, ht = chunk_states(k, v, slope, h0, plan, h)
    o = torch.empty(T, h, dv, dtype=q.dtype, device=q.device)
    bk, bv = tile(dk, q.dtype), tile(dv, q.dtype)
    grid = grids(plan.num_chunks, plan.num_docs, h, dk, dv, q.dtype)["output"]
    mode, smode = dot_modes(q.dtype)
    tune = lightning_tuning("chunk", q.device)
    launch(_output_kernel, grid, (q, k, v, slope, hbuf, o, plan.cu, plan.chunk_indices, plan.num_chunks),
           dict(H=h, HKV=k.shape[1], DK=dk, DV=dv, C=plan.chunk_size, BK=bk, BV=bv, MODE=mode, SMODE=smode),
           default=tune.default, space=tune.space, key=TUNE_KEY, device=q.device)
    return o, ht
