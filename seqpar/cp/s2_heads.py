"""S2-aware head placement under Ulysses / USP: which kv heads (with their GQA query heads) each
Ulysses member computes (docs/cp.md, "S2 head placement").

Ulysses gives each of its ``U`` members whole heads over the whole sequence, and an S2 head's work
is its layout's block count: every head reads its local window, but the stride columns depend on
the head's residue and the last ``num_dense_heads`` kv heads read every causal block. The default
contiguous split (member ``u`` holds kv heads ``u·m .. u·m+m-1``, ``m = H_kv / U``) puts all dense
heads on the last members and neighbouring residues together, so one member can compute far more
blocks than another while the others wait for it.

``placement="balanced"`` counts each kv head's blocks exactly (the kernel's own tile plan over the
partition's documents: :func:`kv_head_blocks`) and splits the kv heads into ``U`` groups of ``m``
with a low largest group (largest first onto the least loaded member, then improving swaps), so dense and sparse heads mix and each member's stride residues complement the
others'. It is used only when strictly better than the contiguous split (otherwise the contiguous
split runs, with no extra copy); the all-to-all then carries the heads in the placement's order
(one ``index_select`` of q, k, v before and of the output after; the bytes on the wire are
unchanged) and each member runs the S2 kernel once per run of consecutive global kv heads it holds
(:func:`s2_runs_forward`). With fewer kv heads than members (kv heads replicated) there is nothing
to choose: the split stays contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from seqpar.cp.partition import Layout, cached_index

PLACEMENTS = ("balanced", "contiguous")


def kv_head_blocks(lay: Layout, layout: Any, kv_heads: int, kv_head_offset: int = 0,
                   total_kv_heads: Optional[int] = None) -> tuple[int, ...]:
    """Block tiles each kv head computes over the partition's real tokens (documents restart the
    layout), from the S2 kernel's plan; ``layout`` resolved (``S2Layout.with_heads``)."""
    from seqpar.kernels.s2.plan import build_plan_uncached

    n = lay.real_len
    cu = lay.doc_start if lay.num_docs > 1 else None
    total = kv_head_offset + kv_heads if total_kv_heads is None else total_kv_heads
    return lay.cached(("s2_head_blocks", layout, kv_heads, kv_head_offset, total), lambda: tuple(
        build_plan_uncached(layout, True, kv_heads, n, n, 0, 0, cu, layout.block_size, kv_head_offset,
                            total).nnz_per_kv_head))


def _balanced(cost: tuple[int, ...], degree: int) -> tuple[tuple[int, ...], ...]:
    """``degree`` groups of ``len(cost) / degree`` heads with a low largest-group cost: largest first
    onto the least loaded open group, then swaps while one lowers the busiest group (a heuristic;
    exact for the usual few heads per member, never worse than its starting point)."""
    m = len(cost) // degree
    groups: list[list[int]] = [[] for _ in range(degree)]
    load = [0] * degree
    for g in sorted(range(len(cost)), key=lambda g: (-cost[g], g)):  # largest first, least-loaded open group
        u = min((u for u in range(degree) if len(groups[u]) < m), key=lambda u: (load[u], u))
        groups[u].append(g)
        load[u] += cost[g]
    # improving swaps: each lowers the sum of squared loads, so the loop ends (bounded anyway)
    for _ in range(len(cost) ** 2):
        a = max(range(degree), key=lambda u: (load[u], -u))
        best = None
        for b in range(degree):
            for x in groups[a] if b != a else ():
                for y in groups[b]:
                    d = cost[x] - cost[y]
                    if d > 0 and load[b] + d < load[a] and (best is None or max(load[a] - d, load[b] + d) < best[0]):
                        best = (max(load[a] - d, load[b] + d), b, x, y, d)
        if best is None:
            break
        _, b, x, y, d = best
        groups[a][groups[a].index(x)], groups[b][groups[b].index(y)] = y, x
        load[a], load[b] = load[a] - d, load[b] + d
    return tuple(tuple(sorted(g)) for g in groups)


@dataclass(frozen=True)
class HeadPlacement:
    """kv heads of each Ulysses member (local kv head indices of the call, ascending per member).

    ``blocks[u]``: block tiles member ``u`` computes (query heads x kv-head tiles over the whole
    sequence); ``contiguous_blocks``: the same for the contiguous split; ``placement``: the
    requested mode; ``identity``: the contiguous split runs (no permutation)."""

    placement: str
    group: int                          # query heads per kv head (GQA)
    kv_heads: tuple[tuple[int, ...], ...]
    blocks: tuple[int, ...]
    contiguous_blocks: tuple[int, ...]

    @property
    def degree(self) -> int:
        return len(self.kv_heads)

    @property
    def identity(self) -> bool:
        order = [g for gs in self.kv_heads for g in gs]
        return order == sorted(order)

    @property
    def order(self) -> tuple[int, ...]:
        """kv heads in the order the all-to-all carries them (member-major)."""
        return tuple(g for gs in self.kv_heads for g in gs)

    def runs(self, member: int, kv_head_offset: int = 0) -> tuple[tuple[int, int, int], ...]:
        """``(local start, global kv head, length)`` of each run of consecutive kv heads ``member``
        holds after the all-to-all (global = ``kv_head_offset`` + the call's kv head index)."""
        out: list[list[int]] = []
        for i, g in enumerate(self.kv_heads[member]):
            if out and out[-1][1] + out[-1][2] == g:
                out[-1][2] += 1
            else:
                out.append([i, g, 1])
        return tuple((a, g + kv_head_offset, n) for a, g, n in out)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int64 ``(q heads, kv heads, inverse q heads)`` in the all-to-all's order, on ``device``."""
        def build():
            kv = torch.tensor(self.order, dtype=torch.int64)
            q = (kv[:, None] * self.group + torch.arange(self.group)[None, :]).reshape(-1)
            return q, kv, torch.argsort(q)
        return cached_index(("s2_heads", self), device, build)


def head_placement(lay: Layout, layout: Any, *, heads: int, kv_heads: int, degree: int, placement: str = "balanced",
                   kv_head_offset: int = 0, total_kv_heads: Optional[int] = None) -> HeadPlacement:
    """The kv heads each of ``degree`` Ulysses members computes for S2 ``layout`` (resolved) on
    partition ``lay`` (cached on it): ``placement="balanced"`` when strictly fewer blocks on the
    busiest member than the contiguous split, else contiguous. ``heads`` / ``kv_heads``: this
    call's (a TP rank's) query / kv heads, global kv heads ``kv_head_offset ..`` of ``total_kv_heads``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"head_placement must be one of {PLACEMENTS}, got {placement!r}")

    def build() -> HeadPlacement:
        grp = heads // kv_heads
        if kv_heads < degree:  # replicated kv heads: every member holds a share of one kv head
            cost = kv_head_blocks(lay, layout, kv_heads, kv_head_offset, total_kv_heads)
            per = tuple(cost[u * kv_heads // degree] * (heads // degree) for u in range(degree))
            return HeadPlacement(placement, grp, tuple((u * kv_heads // degree,) for u in range(degree)), per, per)
        m = kv_heads // degree
        cost = kv_head_blocks(lay, layout, kv_heads, kv_head_offset, total_kv_heads)
        contig = tuple(tuple(range(u * m, (u + 1) * m)) for u in range(degree))

        def blocks(groups):
            return tuple(sum(cost[g] for g in gs) * grp for gs in groups)
        chosen = contig
        if placement == "balanced" and m > 1:
            bal = _balanced(cost, degree)
            if max(blocks(bal)) < max(blocks(contig)):
                chosen = bal
        return HeadPlacement(placement, grp, chosen, blocks(chosen), blocks(contig))
    return lay.cached(("s2_placement", layout, heads, kv_heads, degree, placement, kv_head_offset, total_kv_heads),
                      build)


def permute_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [b, s, heads, d]`` with its heads in the order ``idx`` (differentiable)."""
    return x.index_select(2, idx)


def s2_runs_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: tuple[tuple[int, int, int], ...],
                    total_kv_heads: Optional[int], **kw: Any):
    """``kernels.s2_attention`` once per run ``(local start, global kv head, length)`` of the local
    kv heads (their query heads alongside), outputs concatenated over the heads; with
    ``return_lse=True`` also the lse (``[b, heads, s]``)."""
    from seqpar import kernels

    if len(runs) == 1:
        return kernels.s2_attention(q, k, v, kv_head_offset=runs[0][1], total_kv_heads=total_kv_heads, **kw)
    g = q.shape[2] // k.shape[2]
    outs = [kernels.s2_attention(q[:, :, a * g:(a + n) * g], k[:, :, a:a + n], v[:, :, a:a + n], kv_head_offset=off,
                                 total_kv_heads=total_kv_heads, **kw) for a, off, n in runs]
    if kw.get("return_lse"):
        return torch.cat([o for o, _ in outs], dim=2), torch.cat([lse for _, lse in outs], dim=1)
    return torch.cat(outs, dim=2)


def s2_runs_backward(q, k, v, out, lse, dout, runs: tuple[tuple[int, int, int], ...], total_kv_heads: Optional[int],
                     **kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s2_attention_backward`` once per run of local kv heads (see :func:`s2_runs_forward`)."""
    from seqpar.kernels.s2.api import s2_attention_backward

    if len(runs) == 1:
        return s2_attention_backward(q, k, v, out, lse, dout, kv_head_offset=runs[0][1],
                                     total_kv_heads=total_kv_heads, **kw)
    g = q.shape[2] // k.shape[2]
    parts = []
    for a, off, n in runs:
        qs = slice(a * g, (a + n) * g)
        parts.append(s2_attention_backward(q[:, :, qs], k[:, :, a:a + n], v[:, :, a:a + n], out[:, :, qs],
                                           lse[:, qs], dout[:, :, qs], kv_head_offset=off,
                                           total_kv_heads=total_kv_heads, **kw))
    return tuple(torch.cat([p[i] for p in parts], dim=2) for i in range(3))
