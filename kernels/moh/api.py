"""Public entry of MoH attention: validation, defaults, backend choice, docstring."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._common import check_data, check_int, check_qkv, check_tensor, default_sm_scale, select_backend, varlen_bounds
from .torch_impl import moh_attention_torch

_SEGS: dict = {}


def _segments(cu: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 ``[2, seq]``: each token's document start and end, built once per layout and device."""
    key = (cu, str(device))
    hit = _SEGS.get(key)
    if hit is None:
        lens = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])])
        start = torch.tensor(cu[:-1]).repeat_interleave(lens)
        hit = torch.stack([start, start + lens.repeat_interleave(lens)]).to(torch.int32).to(device)
        if len(_SEGS) > 64:
            _SEGS.clear()
        _SEGS[key] = hit
    return hit


def moh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *,
                  causal: bool = True, sm_scale: Optional[float] = None, return_lse: bool = False,
                  q_offset: Optional[int] = None, k_offset: int = 0, cu_seqlens: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mixture-of-Head attention that computes only the (token, head) pairs with a nonzero gate.

    ``o[b, t, h] = gates[b, t, h] * softmax(q[b, t, h] . K_h^T * sm_scale) V_h`` where K_h, V_h
    belong to the kv head of query head h (GQA, never expanded in memory). A pair with gate 0 is
    neither computed in forward nor read in backward; its output is 0. Every key and value of every
    token is used: an active query attends to all the keys it can see. Example, 6 tokens, 4 heads,
    one shared head (h0, always on) and top-2 of 3 routed heads (x = computed, . = skipped)::

        token  h0 h1 h2 h3
          0     x  x  .  x
          1     x  .  x  x
          2     x  x  x  .
          3     x  .  x  x
          4     x  x  .  x
          5     x  x  x  .       -> 18 of 24 pairs computed (75 %)

    Args:
        q: ``[batch, seq_q, heads, dim]``.
        k, v: ``[batch, seq_k, kv_heads, dim]``; ``kv_heads`` divides ``heads``.
        gates: ``[batch, seq_q, heads]``, >= 0, dtype of ``q`` or float32 (router output).
        causal: query i (at position ``q_offset + i``) sees key j (at ``k_offset + j``) iff
            ``q_offset + i >= k_offset + j``.
        sm_scale: softmax scale, default ``dim ** -0.5``.
        return_lse: also return the fp32 log-sum-exp ``[batch, heads, seq_q]`` of the UNGATED
            scores (natural log; -inf for pairs with gate 0 and for rows that see no key).
            Gradients flow through it, so context-parallel merges can use it.
        q_offset, k_offset: absolute positions of the first query / key (context parallelism).
            Default ``q_offset = k_offset + seq_k - seq_q`` (bottom-right aligned; with
            ``seq_q == seq_k`` the plain causal mask). A row that sees no key gets o = 0.
        cu_seqlens: int32 ``[docs + 1]`` with batch 1 (packed documents, ``seq_q == seq_k``): a
            query attends only to the keys of its own document (causal or the whole document);
            the gates travel with their tokens. Not combinable with offsets.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch".

    Returns:
        ``o`` ``[batch, seq_q, heads, dim]`` in the dtype of q, or ``(o, lse)``.
        Gradients reach q, k, v and gates (``dgates = rowsum(do * attention_output)``).

    Use :func:`seqpar.kernels.moh.count_computed_pairs` to count the computed pairs.
    """
    b, sq, sk, h, hkv, d = check_qkv(q, k, v)
    check_tensor("gates", gates, 3)
    if tuple(gates.shape) != (b, sq, h):
        raise ValueError(f"gates must have shape [batch, seq_q, heads] = {(b, sq, h)}, got {tuple(gates.shape)}")
    if gates.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"gates dtype {gates.dtype} must be q's dtype {q.dtype} or torch.float32; "
                         f"cast it with gates.to(q.dtype)")
    if gates.device != q.device:
        raise ValueError(f"gates is on {gates.device} but q is on {q.device}; move it with gates.to(q.device)")
    check_data(~(gates.detach() >= 0), "gates must be >= 0 and not NaN (a gate of 0 skips the pair); "
                                       "e.g. use softmax/top-k weights or gates.clamp_min(0)")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    scale = default_sm_scale(sm_scale, d)
    k_offset = check_int("k_offset", k_offset)
    cu = varlen_bounds(cu_seqlens, q_offset, k_offset, b, sq, sk, q.device)
    q_offset = k_offset + sk - sq if q_offset is None else check_int("q_offset", q_offset)
    if select_backend(backend, q, k, v) == "triton":
        from .function import MoHAttentionFunction  # imports triton only when used

        # the kernels index the head dim with unit stride; other strides are passed through
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o, lse = MoHAttentionFunction.apply(q, k, v, gates, causal, scale, q_offset, k_offset,
                                            None if cu is None or len(cu) == 2 else _segments(cu, q.device))
    elif cu is None or len(cu) == 2:
        o, lse = moh_attention_torch(q, k, v, gates, causal=causal, sm_scale=scale, q_offset=q_offset,
                                     k_offset=k_offset, need_lse=return_lse)
    else:  # the torch fallback runs each document on its own
        parts = [moh_attention_torch(q[:, s0:s1], k[:, s0:s1], v[:, s0:s1], gates[:, s0:s1], causal=causal,
                                     sm_scale=scale, q_offset=0, k_offset=0, need_lse=return_lse)
                 for s0, s1 in zip(cu[:-1], cu[1:])]
        o = torch.cat([x for x, _ in parts], dim=1)
        lse = torch.cat([x for _, x in parts], dim=2) if return_lse else None
    return (o, lse) if return_lse else o


def moh_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, do: torch.Tensor, *, causal: bool = True,
                           sm_scale: Optional[float] = None, q_offset: Optional[int] = None, k_offset: int = 0,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of MoH attention of ``q`` over the key block ``k, v`` given each
    (token, head)'s *final* gated ``o`` and ungated ``lse`` (possibly merged over more keys, as in a
    context-parallel ring). Inactive pairs (gate 0) are not read. The gate gradient depends on the
    final output only, ``dgates = rowsum(do * o) / gates`` (0 where inactive): the caller forms it
    once. No autograd."""
    b, sq, sk, h, hkv, d = check_qkv(q, k, v)
    scale = default_sm_scale(sm_scale, d)
    k_offset = check_int("k_offset", k_offset)
    q_offset = k_offset + sk - sq if q_offset is None else check_int("q_offset", q_offset)
    if select_backend(backend, q, k, v) == "triton":
        from .rows import build_active_rows
        from .triton_bwd import moh_bwd

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        lse = lse.contiguous()  # the launcher indexes lse [b, h, sq] densely (a ring passes a slice)
        dq, dk, dv, _ = moh_bwd(do, torch.zeros_like(lse), q, k, v, gates, o, lse, build_active_rows(gates),
                                causal=causal, sm_scale=scale, q_offset=q_offset, k_offset=k_offset)
        return dq, dk, dv
    # torch fallback: the dense backward of the ungated attention with the gated upstream gradient
    from seqpar.kernels.flash.api import flash_attention_backward

    g = gates.float().unsqueeze(-1)
    o_ungated = torch.where(g > 0, o.float() / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(g))
    return flash_attention_backward(q, k, v, o_ungated, lse, (do.float() * g).to(q.dtype), causal=causal,
                                    sm_scale=scale, q_offset=q_offset, k_offset=k_offset, backend="torch")
