"""Public entry: ``lightning_attention`` (validation, defaults, backend choice, docstring)."""

from __future__ import annotations

from typing import Optional

import torch

from .._common import check_cu_seqlens, check_qkv, select_backend
from .chunked import lightning_chunked

# Tokens per chunk: Lightning-2's block size (tl.dot tiles need >= 16; 64 balances the quadratic
# intra-block part against the per-chunk state traffic).
CHUNK_SIZE = 64


def _check_slope(slope, num_heads: int, device: torch.device) -> None:
    if not isinstance(slope, torch.Tensor):
        raise ValueError(f"slope must be a torch.Tensor [num_heads], got {type(slope).__name__}; "
                         "see lightning_slopes(num_heads)")
    if slope.shape != (num_heads,):
        raise ValueError(f"slope must have shape [num_heads] = [{num_heads}], got {tuple(slope.shape)}")
    if not slope.is_floating_point():
        raise ValueError(f"slope must be a floating-point tensor, got {slope.dtype}; use .float()")
    if slope.device != device:
        raise ValueError(f"slope is on {slope.device} but q is on {device}; move it with .to(q.device)")
    if not bool((torch.isfinite(slope) & (slope >= 0)).all()):  # one host sync
        raise ValueError(f"slope must be finite and >= 0 (decay exp(-slope) <= 1), got {slope.tolist()}")


def _check_state(name: str, state, num: int, h: int, dk: int, dv: int, device: torch.device) -> None:
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(state).__name__}")
    if state.shape != (num, h, dk, dv):
        raise ValueError(f"{name} must have shape [{num}, {h}, {dk}, {dv}] "
                         f"([batch or num_docs, heads, dk, dv]), got {tuple(state.shape)}")
    if state.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (states are kept in fp32), got {state.dtype}; use .float()")
    if state.device != device:
        raise ValueError(f"{name} is on {state.device} but q is on {device}")


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, *,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto"
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with per-head exponential decay (Lightning Attention-2).

    Per query head ``h``, with ``λ = exp(-slope[h])`` and a state ``S`` of shape ``[dk, dv]``::

        S_{-1} = initial_state (zeros if None)
        S_t    = λ S_{t-1} + k_tᵀ v_t
        o_t    = q_t S_t          ( = Σ_{s≤t} λ^{t-s} (q_t·k_s) v_s + λ^{t+1} q_t S_{-1} )

    No softmax and no scale. Computed in Lightning-2 blocks (intra-block ``((Q Kᵀ) ⊙ D) V`` plus
    inter-block ``Λ Q KV``) with fp32 state and decays in log space, so any slope in [0, ∞) and
    any length stay finite.

    Args:
        q: ``[batch, seq, heads, dk]``.
        k: ``[batch, seq, kv_heads, dk]``; ``kv_heads`` divides ``heads`` (GQA: a k/v head feeds
            ``heads // kv_heads`` consecutive query heads; the decay and state stay per query head).
        v: ``[batch, seq, kv_heads, dv]``; ``dv`` may differ from ``dk``.
        slope: ``[heads]`` float, >= 0 (see :func:`lightning_slopes`). Not trainable: it gets no
            gradient.
        initial_state: fp32 ``[batch, heads, dk, dv]`` (``[num_docs, heads, dk, dv]`` with
            ``cu_seqlens``) or None for zeros. Differentiable.
        output_final_state: also return ``S`` after the last token (per document), fp32, same
            shape as ``initial_state``. Gradients flow back through it (CP chains states).
        cu_seqlens: int32 ``[num_docs + 1]`` document offsets with ``batch == 1``; the state
            restarts (from ``initial_state[doc]``) at each document::

                tokens   a a a b b c c c c      cu_seqlens = [0, 3, 5, 9]
                state    S0->...|S1->|S2->...   no decay or state crosses a '|'

        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, torch chunked otherwise),
            "triton" or "torch".

    Returns:
        ``(o [batch, seq, heads, dv] in q's dtype, final_state or None)``.

    Notes:
        The Triton path keeps one state snapshot per 64-token chunk (``seq/64 x heads x dk x dv``,
        bf16 for bf16 inputs, fp32 otherwise) and recomputes it in backward instead of saving
        it. Validation reads ``slope`` (and ``cu_seqlens``) on the host: one sync per call.
    """
    b, n, nk, h, hkv, dk = check_qkv(q, k, v, same_dv=False)
    if nk != n:
        raise ValueError(f"q and k/v must have the same seq length for linear attention, got {n} and {nk}")
    dv = v.shape[-1]
    _check_slope(slope, h, q.device)
    cu_seqlens = check_cu_seqlens(cu_seqlens, b, n)
    num = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state("initial_state", initial_state, num, h, dk, dv, q.device)
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
    if select_backend(backend, q, k, v) == "triton":
        from .function import LightningFunction

        o, final = LightningFunction.apply(q, k, v, slope.detach(), initial_state, cu_seqlens, CHUNK_SIZE)
    else:
        o, final = lightning_chunked(q, k, v, slope.detach(), initial_state, cu_seqlens, CHUNK_SIZE)
    return o, (final if output_final_state else None)
