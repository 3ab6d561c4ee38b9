"""Public entry of dense flash attention. It shares the S2 kernel family: a dense (causal or
full) tile plan walked by the same Triton / torch launchers."""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.kernels.s2.api import prepare
from seqpar.kernels.s2.function import S2AttentionFunction


# 64-token tiles: at head dim 128 every forward / backward kernel compiles for sm_90 without
# spills and with >= 8 resident warps per SM (benchmarks/kernel_resources.py); 128-token tiles
# spill kilobytes in dk/dv, so the tile is not a user knob.
DEFAULT_BLOCK_SIZE = 64


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    sm_scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                    return_lse: bool = False, q_offset: Optional[int] = None, k_offset: int = 0,
                    window: Optional[int] = None, backend: str = "auto"):
    """Dense softmax attention (flash-style, fp32 accumulation).

    Args:
        q: ``[batch, seq_q, heads, dim]``; k, v: ``[batch, seq_k, kv_heads, dim]`` with kv_heads
            dividing heads (GQA without expanding k/v). fp32 / fp16 / bf16, one device.
        causal: query at position ``q_offset + i`` sees keys at ``k_offset + j <= q_offset + i``.
            Default ``q_offset = k_offset + seq_k - seq_q`` (bottom-right aligned)::

                seq_q=2, seq_k=4:   q0  x x x .
                                    q1  x x x x

        sm_scale: default ``dim ** -0.5``.
        cu_seqlens: int32 ``[docs + 1]`` with batch 1: attention never crosses documents
            (non-causal = full attention within each document). Not combinable with offsets.
        return_lse: also return ``lse`` fp32 ``[batch, heads, seq_q]`` (natural log), differentiable.
        q_offset, k_offset: absolute positions for context parallelism (any ints).
        window: sliding window (Mistral-style, causal only): query at position ``p`` sees keys at
            positions ``p - window < p_k <= p`` (inside its document with ``cu_seqlens``); ``None``
            = full causal. Key tiles wholly outside the window are skipped, not masked, so the
            cost is O(seq_q x window)::

                window=2:   q0  x . . .
                            q1  x x . .
                            q2  . x x .
                            q3  . . x x

        backend: "auto" | "triton" | "torch".

    Returns:
        ``o`` like q, or ``(o, lse)``. Rows that see no key get ``o = 0``, ``lse = -inf`` and zero
        gradients.
    """
    return _flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, cu_seqlens=cu_seqlens,
                            return_lse=return_lse, q_offset=q_offset, k_offset=k_offset, window=window,
                            backend=backend, block_size=DEFAULT_BLOCK_SIZE)


def _flash_attention(q, k, v, *, block_size: int, causal: bool = True, sm_scale=None, cu_seqlens=None,
                     return_lse: bool = False, q_offset=None, k_offset: int = 0, window: Optional[int] = None,
                     backend: str = "auto"):
    """:func:`flash_attention` at another tile size (tests and the CPU demo: smaller tiles mean
    fewer interpreter steps at tiny shapes). Not public: only the default tile is GPU-checked."""
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    bs = block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {bs!r}")
    plan, sm_scale, backend = prepare(q, k, v, layout=None, causal=causal, sm_scale=sm_scale,
                                      cu_seqlens=cu_seqlens, q_offset=q_offset, k_offset=k_offset,
                                      backend=backend, block_size=bs, window=window)
    o, lse = S2AttentionFunction.apply(q, k, v, plan, sm_scale, backend)
    return (o, lse) if return_lse else o


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                             do: torch.Tensor, *, causal: bool = True, sm_scale: Optional[float] = None,
                             q_offset: Optional[int] = None, k_offset: int = 0, window: Optional[int] = None,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of dense attention of ``q`` over the key block ``k, v`` given each
    query row's *final* ``o`` and ``lse`` (possibly merged over more keys, as in a context-parallel
    ring; see :func:`seqpar.kernels.s2.api.s2_attention_backward`). No autograd."""
    from seqpar.kernels.s2.api import attention_backward

    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    plan, sm_scale, backend = prepare(q, k, v, layout=None, causal=causal, sm_scale=sm_scale, cu_seqlens=None,
                                      q_offset=q_offset, k_offset=k_offset, backend=backend,
                                      block_size=DEFAULT_BLOCK_SIZE, window=window)
    return attention_backward(q, k, v, o, lse, do, plan, sm_scale, backend)
