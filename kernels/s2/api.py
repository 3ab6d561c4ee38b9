"""Public entry of S2 attention: validation, defaults, docstring. Also the shared validation
used by :func:`seqpar.kernels.flash_attention` (same interface, dense layout)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from seqpar.kernels._common import (check_cu_seqlens, check_int, check_qkv, check_window, default_sm_scale,
                                    select_backend, varlen_bounds)
from seqpar.kernels.s2.function import S2AttentionFunction
from seqpar.kernels.s2.layout import S2Layout
from seqpar.kernels.s2.plan import TilePlan, build_plan


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: Optional[S2Layout], causal: bool,
            sm_scale: Optional[float], cu_seqlens: Optional[torch.Tensor], q_offset: Optional[int],
            k_offset: int, backend: str, block_size: int, kv_head_offset: int = 0,
            total_kv_heads: Optional[int] = None, window: Optional[int] = None) -> tuple[TilePlan, float, str]:
    """Validate everything (before any launch) and return (plan, sm_scale, backend)."""
    b, sq, sk, h, hkv, d = check_qkv(q, k, v)
    window = check_window(window, causal)
    backend = select_backend(backend, q, k, v)
    sm_scale = default_sm_scale(sm_scale, d)
    k_offset = check_int("k_offset", k_offset)
    if q_offset is not None:
        check_int("q_offset", q_offset)
    cu = varlen_bounds(cu_seqlens, q_offset, k_offset, b, sq, sk, q.device)
    if cu is not None:
        q_offset = 0
    elif q_offset is None:
        q_offset = k_offset + sk - sq  # bottom-right aligned (flash-attn >= 2.1)
    if layout is not None:
        if q_offset < 0 or k_offset < 0:
            raise ValueError(f"S2 needs q_offset and k_offset >= 0 (blocks are absolute: block = position // "
                             f"block_size), got q_offset={q_offset}, k_offset={k_offset}")
        total_kv_heads = layout.validate_head_slice(hkv, kv_head_offset, total_kv_heads)
        # the rotation step follows the model's query heads (the GQA group size is slice-invariant)
        layout = layout.with_heads(h // hkv * total_kv_heads)
    plan = build_plan(layout, causal, hkv, sq, sk, q_offset, k_offset, cu, block_size, kv_head_offset, total_kv_heads,
                      window)
    return plan, sm_scale, backend


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: S2Layout, *,
                 sm_scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                 return_lse: bool = False, q_offset: Optional[int] = None, k_offset: int = 0,
                 causal: bool = True, kv_head_offset: int = 0, total_kv_heads: Optional[int] = None,
                 backend: str = "auto"):
    """S2 (sparse-sharded) causal block-sparse attention.

    Args:
        q: ``[batch, seq_q, heads, dim]``; k, v: ``[batch, seq_k, kv_heads, dim]`` with kv_heads
            dividing heads (GQA; k/v are never expanded). fp32 / fp16 / bf16, one device.
        layout: :class:`S2Layout`. Block ``(i, j)`` of kv head ``g`` is computed iff ``j <= i`` and
            (``i - j < local_blocks`` or ``(j + g*step + head_sliding_offset) % vert_stride == 0``),
            ``step = layout.head_sliding_step`` or DKernel's ``max(1, vert_stride // heads)``
            (query heads of the model: ``heads // kv_heads * total_kv_heads``); then token-level
            causality. E.g. vert_stride=4, local_blocks=2, 4 heads, 8 blocks (x = computed)::

                kv head 0          kv head 1
                x                  x
                x x                x x
                x x x              . x x
                x . x x            . . x x
                x . . x x          . . . x x
                x . . . x x        . . . x x x
                x . . . x x x      . . . x . x x
                x . . . x . x x    . . . x . . x x

        sm_scale: score scale, default ``dim ** -0.5``.
        cu_seqlens: int32 ``[docs + 1]`` with batch 1: attention stays inside each document and
            the layout restarts at each document start (documents need not be block-aligned).
        return_lse: also return ``lse`` fp32 ``[batch, heads, seq_q]`` (natural log); gradients
            flow through it.
        q_offset, k_offset: absolute positions of q row 0 and k row 0 (context parallelism,
            decoding), any ints >= 0 (one-token decode at position p: ``q_offset=p``). Default
            ``q_offset = k_offset + seq_k - seq_q``. The block of a token is ``position //
            block_size``. Not combinable with cu_seqlens.
        causal: must be True: S2 is causal by construction (ValueError otherwise).
        kv_head_offset, total_kv_heads: for a slice of the heads (head-sharded context
            parallelism): local kv head ``g`` is global kv head ``kv_head_offset + g`` of
            ``total_kv_heads`` (default: local kv heads + offset), so ``step`` uses the global
            head count and the dense heads are the last ``num_dense_heads`` *global* kv heads. The
            result equals the same heads of the full call.
        backend: "auto" | "triton" | "torch" (block-sparse torch fallback, O(seq * block) memory).

    Returns:
        ``o`` like q, or ``(o, lse)``. A query that sees no key (possible with offsets) gets
        ``o = 0``, ``lse = -inf`` and zero gradients.
    """
    if not isinstance(layout, S2Layout):
        raise ValueError(f"layout must be an S2Layout, got {type(layout).__name__}")
    if causal is not True:
        raise ValueError("causal must be True: S2 attention is causal only; use flash_attention(causal=False)")
    plan, sm_scale, backend = prepare(q, k, v, layout=layout, causal=True, sm_scale=sm_scale,
                                      cu_seqlens=cu_seqlens, q_offset=q_offset, k_offset=k_offset,
                                      backend=backend, block_size=layout.block_size,
                                      kv_head_offset=kv_head_offset, total_kv_heads=total_kv_heads)
    o, lse = S2AttentionFunction.apply(q, k, v, plan, sm_scale, backend)
    return (o, lse) if return_lse else o


def s2_stats(layout: S2Layout, seq_len: int, num_heads: int, num_kv_heads: int,
             cu_seqlens: Optional[Union[torch.Tensor, Sequence[int]]] = None) -> dict:
    """Blocks S2 computes for one sequence (or packed batch), summed over the q heads.

    Returns ``{"computed_blocks", "causal_blocks", "density"}`` where causal_blocks counts the
    tile pairs dense causal attention at the same block size would compute.
    """
    if not isinstance(layout, S2Layout):
        raise ValueError(f"layout must be an S2Layout, got {type(layout).__name__}")
    check_int("seq_len", seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if check_int("num_kv_heads", num_kv_heads) < 1 or check_int("num_heads", num_heads) % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    cu = None
    if cu_seqlens is not None:
        t = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.tensor(list(cu_seqlens), dtype=torch.int32)
        check_cu_seqlens(t, 1, seq_len)
        cu = tuple(int(x) for x in t.tolist())
    layout.validate_heads(num_kv_heads)
    layout = layout.with_heads(num_heads)
    bs = layout.block_size
    sparse = build_plan(layout, True, num_kv_heads, seq_len, seq_len, 0, 0, cu, bs).nnz(num_heads)
    dense = build_plan(None, True, num_kv_heads, seq_len, seq_len, 0, 0, cu, bs).nnz(num_heads)
    return {"computed_blocks": sparse, "causal_blocks": dense, "density": sparse / dense}


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                       do: torch.Tensor, plan: TilePlan, sm_scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward launcher of ``backend`` on a prepared plan (no autograd)."""
    if backend == "triton":
        from seqpar.kernels.s2.triton_bwd import s2_bwd

        return s2_bwd(q, k, v, o, lse, do, None, plan, sm_scale)
    from seqpar.kernels.s2.torch_impl import s2_bwd_torch

    return s2_bwd_torch(q, k, v, o, lse, do, None, plan, sm_scale)


def s2_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                          do: torch.Tensor, layout: S2Layout, *, sm_scale: Optional[float] = None,
                          q_offset: Optional[int] = None, k_offset: int = 0, kv_head_offset: int = 0,
                          total_kv_heads: Optional[int] = None,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of S2 attention of ``q`` over the key block ``k, v`` given each
    query row's *final* ``o`` ``[batch, seq_q, heads, dv]`` and ``lse`` fp32 ``[batch, heads, seq_q]``.

    ``o`` / ``lse`` may be merged over more keys than ``k, v`` hold (a context-parallel ring): with
    ``p = exp(s - lse)`` and ``delta = rowsum(do * o)`` the result is exactly this block's share
    of the full gradient (flash-attn's ring backward), so no forward is recomputed. Arguments as in
    :func:`s2_attention`; no autograd. A row with ``lse = -inf`` gets zero gradients.
    """
    if not isinstance(layout, S2Layout):
        raise ValueError(f"layout must be an S2Layout, got {type(layout).__name__}")
    plan, sm_scale, backend = prepare(q, k, v, layout=layout, causal=True, sm_scale=sm_scale, cu_seqlens=None,
                                      q_offset=q_offset, k_offset=k_offset, backend=backend,
                                      block_size=layout.block_size, kv_head_offset=kv_head_offset,
                                      total_kv_heads=total_kv_heads)
    return attention_backward(q, k, v, o, lse, do, plan, sm_scale, backend)
