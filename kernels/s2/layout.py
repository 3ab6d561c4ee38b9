"""S2 block layout: which (q block, kv block) pairs each head computes (docs/s2.md).

Semantics are DKernel's ``get_sparse_attn_mask`` (``dkernel/utils.py``, the reference of the S2
paper): for kv head ``g``, block ``(i, j)`` is visible iff ``j <= i`` and
(``i - j < local_blocks`` or ``(j + g * step + head_sliding_offset) % vert_stride == 0``), with

    step = head_sliding_step            if given explicitly,
           max(1, vert_stride // num_heads)   otherwise (num_heads = QUERY heads of the model),
           0                            with homo_head=True.

The q heads of a GQA group share their kv head's pattern (DKernel builds the mask per kv head and
repeats it ``num_heads // num_kv_heads`` times), so k/v blocks are read once per group. The last
``num_dense_heads`` kv heads see every causal block.

Because DKernel divides by the *query* heads, a GQA model whose ``vert_stride >= 2 * num_kv_heads``
does not spread its kv heads evenly over the stride residues (8 heads, 2 kv heads, vert_stride 8:
step 1, kv head 1 reads columns 7, 15, ...). ``head_sliding_step=vert_stride // num_kv_heads``
gives the evenly spread rotation instead (kv head 1 reads columns 4, 12, ...); it is a different
model, chosen explicitly.

Other notes:

* The stride test is ``j + g*step + offset``: ``head_sliding_offset=0`` makes kv head 0 read column
  0. That is DKernel's current code; the ``+ 1`` found in some copies of the older Triton
  block-sparse kernel (e.g. vLLM's ``blocksparse_attention``) is a different convention
  (``head_sliding_offset=1`` here).
* Block indices are absolute: block of a token = position // block_size. ``block_mask`` aligns
  the q blocks bottom-right (q block ``i`` is absolute block ``num_kv_blocks - num_q_blocks + i``),
  matching the default ``q_offset`` of :func:`seqpar.kernels.s2_attention`.
* The step depends on the model's head count, not on how heads are sharded: a head slice (TP,
  Ulysses) must use the *resolved* layout (:meth:`S2Layout.with_heads`), whose step is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class S2Layout:
    """Per-head strided block-sparse causal layout (hashable: it keys the index-list cache).

    Fields: ``block_size`` (tokens per block, power of two >= 16; also the Triton tile),
    ``local_blocks`` (diagonal band width in blocks, >= 1), ``vert_stride`` (every
    ``vert_stride``-th kv block column is read, >= 1), ``homo_head`` (all heads share kv head 0's
    pattern), ``num_dense_heads`` (the last kv heads that read every causal block),
    ``head_sliding_offset`` (extra rotation of the stride, >= 0), ``head_sliding_step`` (rotation
    between consecutive kv heads; ``None`` = DKernel's ``max(1, vert_stride // num_heads)`` with
    the model's query heads, fixed by :meth:`with_heads`).

    Example (DKernel's default step): 8 heads, 2 kv heads, vert_stride=8, local_blocks=1, 16
    blocks: step = max(1, 8 // 8) = 1, so kv head 0 reads columns 0, 8 and kv head 1 columns 7, 15
    (``head_sliding_step=4`` would give kv head 1 columns 4, 12)::

        kv head 1, rows 12..15 (x = computed, . = skipped)
        q\\k  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
        12   .  .  .  .  .  .  .  x  .  .  .  .  x
        13   .  .  .  .  .  .  .  x  .  .  .  .  .  x
        14   .  .  .  .  .  .  .  x  .  .  .  .  .  .  x
        15   .  .  .  .  .  .  .  x  .  .  .  .  .  .  .  x
    """

    block_size: int = 64
    local_blocks: int = 4
    vert_stride: int = 4
    homo_head: bool = False
    num_dense_heads: int = 0
    head_sliding_offset: int = 0
    head_sliding_step: Optional[int] = None

    def __post_init__(self) -> None:
        def _int(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"S2Layout.{name} must be an int, got {v!r}")
            return v

        bs = _int("block_size")
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"S2Layout.block_size must be a power of two >= 16 (Triton tile), got {bs}")
        if _int("local_blocks") < 1:
            raise ValueError(f"S2Layout.local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")
        if _int("vert_stride") < 1:
            raise ValueError(f"S2Layout.vert_stride must be >= 1, got {self.vert_stride}")
        if _int("num_dense_heads") < 0:
            raise ValueError(f"S2Layout.num_dense_heads must be >= 0, got {self.num_dense_heads}")
        if _int("head_sliding_offset") < 0:
            raise ValueError(f"S2Layout.head_sliding_offset must be >= 0, got {self.head_sliding_offset}")
        if not isinstance(self.homo_head, bool):
            raise ValueError(f"S2Layout.homo_head must be a bool, got {self.homo_head!r}")
        if self.head_sliding_step is not None:
            if _int("head_sliding_step") < 0:
                raise ValueError(f"S2Layout.head_sliding_step must be >= 0 or None, got {self.head_sliding_step}")
            if self.homo_head and self.head_sliding_step:
                raise ValueError(f"S2Layout.homo_head=True gives every head one pattern (step 0); "
                                 f"head_sliding_step={self.head_sliding_step} would be ignored: drop one of them")

    @property
    def resolved(self) -> bool:
        """True when the rotation step no longer depends on a head count (explicit or homo_head)."""
        return self.homo_head or self.head_sliding_step is not None

    def head_step(self, num_heads: Optional[int] = None) -> int:
        """Stride rotation between consecutive kv heads: ``head_sliding_step`` if set, 0 with
        ``homo_head``, else DKernel's ``max(1, vert_stride // num_heads)`` with ``num_heads`` the
        model's QUERY heads (required then)."""
        if self.homo_head:
            return 0
        if self.head_sliding_step is not None:
            return self.head_sliding_step
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(
                f"S2Layout(head_sliding_step=None) takes its rotation step from the model's query heads "
                f"(max(1, vert_stride // num_heads), as DKernel); pass num_heads (got {num_heads!r}) or use "
                f"layout.with_heads(num_heads)")
        return max(1, self.vert_stride // num_heads)

    def with_heads(self, num_heads: int) -> "S2Layout":
        """This layout with the rotation step fixed for a model of ``num_heads`` query heads (no-op
        when already resolved). Head slices (TP ranks, Ulysses) must use the resolved layout."""
        if self.resolved:
            return self
        return replace(self, head_sliding_step=self.head_step(num_heads))

    def validate_heads(self, num_kv_heads: int) -> None:
        """ValueError unless the layout fits ``num_kv_heads`` (dense heads are kv heads)."""
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        if self.num_dense_heads > num_kv_heads:
            raise ValueError(
                f"S2Layout.num_dense_heads ({self.num_dense_heads}) exceeds num_kv_heads ({num_kv_heads}); "
                f"lower num_dense_heads"
            )

    def validate_head_slice(self, num_kv_heads: int, kv_head_offset: int, total_kv_heads: Optional[int]) -> int:
        """Check a slice of kv heads (local head ``g`` is global ``kv_head_offset + g``); return the
        global kv head count. Used when heads are sharded (Ulysses CP): the rotation step and the
        dense heads follow the *global* kv heads."""
        if isinstance(kv_head_offset, bool) or not isinstance(kv_head_offset, int) or kv_head_offset < 0:
            raise ValueError(f"kv_head_offset must be an int >= 0, got {kv_head_offset!r}")
        total = num_kv_heads + kv_head_offset if total_kv_heads is None else total_kv_heads
        if isinstance(total, bool) or not isinstance(total, int) or total < kv_head_offset + num_kv_heads:
            raise ValueError(f"total_kv_heads ({total_kv_heads!r}) must be an int >= kv_head_offset + local kv heads "
                             f"= {kv_head_offset} + {num_kv_heads}")
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
        self.validate_heads(total)  # the dense heads are the last global ones: a slice may hold fewer
        return total

    def kv_block_mask(self, num_kv_heads: int, q_blocks: torch.Tensor, k_blocks: torch.Tensor, *,
                      kv_head_offset: int = 0, total_kv_heads: Optional[int] = None,
                      num_heads: Optional[int] = None) -> torch.Tensor:
        """bool ``[num_kv_heads, len(q_blocks), len(k_blocks)]`` for absolute block indices.

        Row ``g`` is global kv head ``kv_head_offset + g`` of ``total_kv_heads`` (default: all of
        them, offset 0), so a head slice gets exactly its rows of the full mask. ``num_heads``:
        the model's query heads, needed (only) when the layout is not :attr:`resolved`.
        """
        total = self.validate_head_slice(num_kv_heads, kv_head_offset, total_kv_heads)
        step = self.head_step(num_heads)
        qi = q_blocks.to(torch.int64)[None, :, None]
        kj = k_blocks.to(torch.int64)[None, None, :]
        g = kv_head_offset + torch.arange(num_kv_heads, dtype=torch.int64)[:, None, None]
        causal = kj <= qi
        local = (qi - kj) < self.local_blocks
        strided = (kj + g * step + self.head_sliding_offset) % self.vert_stride == 0
        mask = causal & (local | strided)
        if self.num_dense_heads:
            dense = g >= total - self.num_dense_heads
            mask = torch.where(dense, causal, mask)
        return mask

    def block_mask(self, num_heads: int, num_kv_heads: int, num_q_blocks: int, num_kv_blocks: int) -> torch.Tensor:
        """bool ``[num_heads, num_q_blocks, num_kv_blocks]``; q heads of a GQA group share a row pattern.

        q blocks are bottom-right aligned: q block ``i`` is absolute block
        ``num_kv_blocks - num_q_blocks + i`` (so equal counts give the usual causal layout).
        """
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}) for GQA")
        if num_q_blocks < 1 or num_kv_blocks < num_q_blocks:
            raise ValueError(
                f"need 1 <= num_q_blocks <= num_kv_blocks, got num_q_blocks={num_q_blocks}, "
                f"num_kv_blocks={num_kv_blocks}"
            )
        q = torch.arange(num_kv_blocks - num_q_blocks, num_kv_blocks)
        m = self.kv_block_mask(num_kv_heads, q, torch.arange(num_kv_blocks), num_heads=num_heads)
        return m.repeat_interleave(num_heads // num_kv_heads, dim=0)

    def picture(self, num_kv_heads: int, num_blocks: int, heads: Optional[Sequence[int]] = None,
                num_heads: Optional[int] = None) -> str:
        """ASCII block picture of the given kv heads side by side (x = computed, . = skipped);
        ``num_heads`` query heads (default ``num_kv_heads``) set the default rotation step."""
        heads = list(range(min(num_kv_heads, 4))) if heads is None else list(heads)
        m = self.kv_block_mask(num_kv_heads, torch.arange(num_blocks), torch.arange(num_blocks),
                               num_heads=num_kv_heads if num_heads is None else num_heads)
        w = len(str(num_blocks - 1))
        header = "q\\k " + " ".join(str(j).rjust(w) for j in range(num_blocks))
        width = len(header)
        cols = []
        for g in heads:
            lines = [f"kv head {g}".ljust(width), header]
            for i in range(num_blocks):
                cells = ["x" if m[g, i, j] else ("." if j <= i else " ") for j in range(num_blocks)]
                lines.append((str(i).ljust(4) + " ".join(c.rjust(w) for c in cells)).rstrip().ljust(width))
            cols.append(lines)
        return "\n".join("   ".join(parts).rstrip() for parts in zip(*cols))
