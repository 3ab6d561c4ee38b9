"""Public entry: ``lightning_attention`` (validation, defaults, backend choice, docstring)."""

from __future__ import annotations

from typing import Optional

import torch

from .._common import check_cu_seqlens, check_data, check_qkv, host_ints, seed_host_ints, select_backend
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
    # one host sync, or deferred to once per step (seqpar.cp.step_checks)
    check_data(~(torch.isfinite(slope) & (slope >= 0)),
               lambda: f"slope must be finite and >= 0 (decay exp(-slope) <= 1), got {slope.tolist()}")


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
                        cu_seqlens: Optional[torch.Tensor] = None, backend: str = "auto",
                        cu_seqlens_unpadded: Optional[torch.Tensor] = None
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
        cu_seqlens_unpadded: with ``cu_seqlens`` of padded documents (``seqpar.cp.pad_varlen``:
            padding at each document's end), the int32 real boundaries (``VarlenPadding.
            original_cu_seqlens``; Megatron's ``cu_seqlens_q`` next to ``cu_seqlens_q_padded``).
            The final state is then each document's state after its last *real* token (the decay
            does not run through the pads), with exact gradients; pad outputs are 0::

                padded   a a a p | b b p p      cu_seqlens = [0, 4, 8]
                real     a a a   | b b          cu_seqlens_unpadded = [0, 3, 5]
                final    S(a a a), S(b b)       (not λ·S(a a a), λ²·S(b b))

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
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}; "
                         f"move it once per step (every layer then reuses it)")
    num = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_state("initial_state", initial_state, num, h, dk, dv, q.device)
    if not isinstance(output_final_state, bool):
        raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
    if cu_seqlens_unpadded is not None:
        return _padded(q, k, v, slope, initial_state, output_final_state, cu_seqlens, cu_seqlens_unpadded, backend)
    if select_backend(backend, q, k, v) == "triton":
        from .function import LightningFunction

        o, final = LightningFunction.apply(q, k, v, slope.detach(), initial_state, cu_seqlens, CHUNK_SIZE)
    else:
        o, final = lightning_chunked(q, k, v, slope.detach(), initial_state, cu_seqlens, CHUNK_SIZE)
    return o, (final if output_final_state else None)


def padded_segments(cu_seqlens: torch.Tensor, cu_seqlens_unpadded: torch.Tensor
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate padded vs real document boundaries. Each padded document becomes its real tokens
    then (if any) its pads as separate segments; returns ``(segment bounds, segment index of each
    document's real part or -1 when it has no real token, 0/1 real flag per segment)``."""
    if cu_seqlens is None:
        raise ValueError("cu_seqlens_unpadded needs cu_seqlens (the padded boundaries)")
    if not isinstance(cu_seqlens_unpadded, torch.Tensor) or cu_seqlens_unpadded.dim() != 1 \
            or cu_seqlens_unpadded.dtype != torch.int32:
        raise ValueError("cu_seqlens_unpadded must be an int32 tensor [num_docs + 1]")
    real, pad = host_ints(cu_seqlens_unpadded), host_ints(cu_seqlens)
    if len(real) != len(pad) or real[0] != 0:
        raise ValueError(f"cu_seqlens_unpadded must be [0, ...] with as many documents as cu_seqlens "
                         f"({len(pad) - 1}), got {list(real)}")
    bounds, real_seg, is_real = [0], [], []
    for i in range(len(pad) - 1):
        n_real, n_pad = real[i + 1] - real[i], pad[i + 1] - pad[i]
        if not 0 <= n_real <= n_pad:
            raise ValueError(f"document {i}: {n_real} real tokens, padded length {n_pad}; cu_seqlens_unpadded "
                             "must be the boundaries before seqpar.cp.pad_varlen (non-decreasing, <= padded)")
        real_seg.append(len(bounds) - 1 if n_real else -1)
        for lo, hi, flag in ((pad[i], pad[i] + n_real, 1), (pad[i] + n_real, pad[i + 1], 0)):
            if hi > lo:
                bounds.append(hi)
                is_real.append(flag)
    return tuple(bounds), tuple(real_seg), tuple(is_real)


_SEGMENTS: dict = {}


def _segment_tensors(bounds: tuple, real_seg: tuple, is_real: tuple, n: int, device: torch.device):
    # built once per document layout and kept on the device (no per-layer host-to-device copy)
    key = (bounds, real_seg, n, str(device))
    hit = _SEGMENTS.get(key)
    if hit is None:
        cu = seed_host_ints(torch.tensor(bounds, dtype=torch.int32).to(device), bounds)
        keep = torch.zeros(n, dtype=torch.bool)
        for j, flag in enumerate(is_real):
            keep[bounds[j]:bounds[j + 1]] = bool(flag)
        nseg = len(bounds) - 1
        # document i's final state: its real segment's, else (no real token) its initial state
        pick = torch.tensor([j if j >= 0 else nseg + i for i, j in enumerate(real_seg)], dtype=torch.int64)
        seg_of_doc = torch.tensor([j for j in real_seg if j >= 0], dtype=torch.int64)
        doc_of_seg = torch.tensor([i for i, j in enumerate(real_seg) if j >= 0], dtype=torch.int64)
        hit = (cu, keep.to(device), pick.to(device), seg_of_doc.to(device), doc_of_seg.to(device))
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        _SEGMENTS[key] = hit
    return hit


def _padded(q, k, v, slope, initial_state, output_final_state, cu_seqlens, cu_seqlens_unpadded, backend):
    bounds, real_seg, is_real = padded_segments(cu_seqlens, cu_seqlens_unpadded)
    cu, keep, pick, seg_of_doc, doc_of_seg = _segment_tensors(bounds, real_seg, is_real, q.shape[1], q.device)
    dk, dv = q.shape[-1], v.shape[-1]
    docs, nseg = len(real_seg), len(bounds) - 1
    init = None
    if initial_state is not None:  # real segments start from their document's state, pad segments from 0
        init = initial_state.new_zeros((nseg, *initial_state.shape[1:])).index_copy(
            0, seg_of_doc, initial_state.index_select(0, doc_of_seg))
    o, final = lightning_attention(q, k, v, slope, initial_state=init, output_final_state=output_final_state,
                                   cu_seqlens=cu, backend=backend)
    o = o * keep[None, :, None, None].to(o.dtype)  # pad outputs are 0 (and pass no gradient)
    if final is None:
        return o, None
    start = initial_state if initial_state is not None else final.new_zeros((docs, q.shape[2], dk, dv))
    return o, torch.cat([final, start]).index_select(0, pick)

