"""Combining partial attention results across ranks, in fp32, with exact gradients.

Softmax: a query's attention over the union of disjoint key sets is the log-sum-exp weighted mix of
the attention over each set. With partials ``(o_i, lse_i)``::

    lse = log Σ_i exp(lse_i)                 o = Σ_i exp(lse_i - lse) · o_i

A partial whose key set was empty for a row has ``lse_i = -inf`` and contributes nothing; if every
partial is empty the row's output is 0 and its lse is -inf (no NaN, forward or backward).

Linear attention with decay (docs/lightning.md: ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``λ = exp(-slope)``):
a chunk's local state ``M_j`` is the state after its last token ``e_j`` starting from zero,
``M_j = Σ_{s in chunk j} λ^{e_j - s} k_sᵀ v_s``. Unrolling the recurrence, the state entering
chunk r (at position ``start_r - 1``) is::

    S_{start_r - 1} = λ^{start_r} S_{-1} + Σ_{j<r} λ^{(start_r - 1) - e_j} M_j

the exponent ``start_r - 1 - e_j`` being the number of tokens strictly between chunk j and chunk r.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["merge_partials", "merge_two", "decayed_state_prefix"]


def _lse_to_bshd(lse: torch.Tensor) -> torch.Tensor:
    # lse [b, h, s] -> [b, s, h, 1] to broadcast against o [b, s, h, d]
    return lse.transpose(1, 2).unsqueeze(-1)


def _check_pair(o: torch.Tensor, lse: torch.Tensor, name: str) -> None:
    if o.dim() != 4 or lse.dim() != 3:
        raise ValueError(f"{name}: out must be [batch, seq, heads, dim] and lse [batch, heads, seq], "
                         f"got {tuple(o.shape)} and {tuple(lse.shape)}")
    b, s, h, _ = o.shape
    if tuple(lse.shape) != (b, h, s):
        raise ValueError(f"{name}: lse shape {tuple(lse.shape)} must be (batch, heads, seq) = {(b, h, s)}")


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial softmax results over disjoint key sets.

    ``outs[i]`` ``[batch, seq, heads, dim]`` (any float dtype), ``lses[i]`` ``[batch, heads, seq]``
    (natural log). Returns ``(out fp32 [batch, seq, heads, dim], lse fp32 [batch, heads, seq])``;
    differentiable w.r.t. every out and lse.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        _check_pair(o, l, f"partial {i}")
        if o.shape != outs[0].shape:
            raise ValueError(f"partial {i}: out shape {tuple(o.shape)} != partial 0 {tuple(outs[0].shape)}")
    lse_all = torch.stack([l.float() for l in lses])  # [n, b, h, s]
    # The max only stabilises exp; detaching it keeps the gradient exact and NaN-free.
    m = lse_all.detach().amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = torch.exp(lse_all - m).sum(0)
    empty = total == 0
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(total), total)))
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    out = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for o, l in zip(outs, lse_all):
        w = _lse_to_bshd(torch.exp(l - lse_safe))
        # A partial that saw no key for a row may hold anything there (even nan); zero it *before*
        # the product so that neither the value nor the gradient of w picks up 0 * nan.
        out = out + w * torch.where(w > 0, o.float(), torch.zeros((), device=o.device))
    return out, lse


def merge_two(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], block_out: torch.Tensor,
              block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running merge for the ring: fold ``(block_out, block_lse)`` into ``(out, lse)``.

    ``out``/``lse`` may be None for the first block. The running pair stays fp32.
    """
    if out is None or lse is None:
        return merge_partials([block_out], [block_lse])
    return merge_partials([out, block_out], [lse, block_lse])


def decayed_state_prefix(states: torch.Tensor, chunk_lens: Union[Sequence[int], torch.Tensor],
                         slope: torch.Tensor, initial_state: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk, and the final state, from per-chunk local states.

    ``states`` ``[n_chunks, batch, heads, dk, dv]`` in *sequence order*, chunk j's state ``M_j``
    after its own tokens starting from zero; ``chunk_lens`` the token count of each chunk;
    ``slope`` ``[heads]`` (λ = exp(-slope)); ``initial_state`` ``[batch, heads, dk, dv]`` or None.

    Returns ``(prefix [n_chunks, batch, heads, dk, dv], final [batch, heads, dk, dv])`` in fp32:
    ``prefix[r] = λ^{start_r} S_{-1} + Σ_{j<r} λ^{start_r - 1 - e_j} M_j`` and ``final`` the state
    after the last chunk. Exponents are integers applied in log space (``exp(-slope · n)``), exact
    for any distance. Differentiable w.r.t. states, slope and initial_state.
    """
    if states.dim() != 5:
        raise ValueError(f"states must be [n_chunks, batch, heads, dk, dv], got {tuple(states.shape)}")
    n, b, h = states.shape[:3]
    if isinstance(chunk_lens, torch.Tensor):
        from seqpar.kernels._common import host_ints

        chunk_lens = host_ints(chunk_lens)  # cached host copy
    lens = tuple(int(x) for x in chunk_lens)
    if len(lens) != n or any(x < 0 for x in lens):
        raise ValueError(f"chunk_lens must hold {n} non-negative lengths, got {list(lens)}")
    if slope.dim() != 1 or slope.numel() != h:
        raise ValueError(f"slope must be [heads] = [{h}], got {tuple(slope.shape)}")
    dist, valid, starts = _prefix_geometry(lens, states.device)
    if initial_state is not None and tuple(initial_state.shape) != tuple(states.shape[1:]):
        raise ValueError(f"initial_state must be {tuple(states.shape[1:])}, got {tuple(initial_state.shape)}")
    acc = weighted_state_prefix(states[None], dist[None], valid[None], starts[None], slope,
                                None if initial_state is None else initial_state[None])[0]
    return acc[:n], acc[n]


def weighted_state_prefix(states: torch.Tensor, dist: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
                          slope: torch.Tensor, initial_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The decayed state at ``T`` target positions of each of ``D`` independent sequences (documents).

    ``states [D, K, b, H, dk, dv]``: each sequence's piece states ``M_k``; ``dist [D, T, K]`` the
    tokens strictly between piece k's end and target t (``target - end_k``), used where ``valid``
    (piece k lies before target t); ``target [D, T]`` the tokens before each target (the initial
    state decays by ``λ^target``); ``initial_state [D, b, H, dk, dv]`` or None. Returns fp32
    ``[D, T, b, H, dk, dv] = Σ_k λ^{dist} M_k + λ^{target} S_init`` (log space, any distance);
    differentiable w.r.t. states, slope and initial_state.
    """
    s32 = slope.float()
    logw = -s32[None, :, None, None] * dist[:, None]  # [D, H, T, K]
    w = torch.where(valid[:, None], torch.exp(logw), torch.zeros((), device=states.device))
    acc = torch.einsum("dhtk,dkbhxy->dtbhxy", w, states.float())
    if initial_state is not None:
        w0 = torch.exp(-s32[None, None, :] * target[:, :, None])  # [D, T, H]
        acc = acc + w0[:, :, None, :, None, None] * initial_state.float()[:, None]
    return acc


def _prefix_geometry(lens: tuple[int, ...], device: torch.device):
    """Distances ``start_r - 1 - e_j`` (clamped, fp32) ``[n + 1, n]``, the ``j < r`` mask, and the
    chunk starts (fp32 ``[n + 1]``), built once per chunk layout and kept on the device."""
    from seqpar.cp.partition import cached_index

    def build():
        ln = torch.tensor(lens, dtype=torch.int64).reshape(-1)
        n = ln.numel()
        starts = torch.cat([ln.new_zeros(1), ln.cumsum(0)])  # start_r, and total at the end
        ends = starts[1:] - 1  # e_j (start_j - 1 for an empty chunk: distance math still holds)
        # dist[r, j] = start_r - 1 - e_j for j < r; row n is the final state (position total - 1).
        dist = (starts[:, None] - 1 - ends[None, :]).clamp_min(0).float()
        valid = torch.arange(n + 1)[:, None] > torch.arange(n)[None, :]
        return dist, valid, starts.float()
    return cached_index(("state_prefix", lens), device, build)
