"""The batch contract: what every data source hands the loop for one (step, seed, DP rank).

``Batch`` holds ``[b, s]`` tensors on the host (CPU): ``tokens``, ``labels`` (``tokens`` shifted by
one), ``loss_mask`` and ``position_ids``. The document boundaries inside each packed row are encoded
in ``position_ids`` alone, exactly:

    a new document (or the row's first, possibly partial, document) starts at every column where
    ``position_ids == 0``; positions count 0, 1, 2, ... within a document.

Megatron's convention decides where a document ends: its EOD token is its *last* token (the next
document starts right after it), as ``GPTDataset(reset_position_ids=True)`` produces. The form is the
cheapest exact one: a fixed-shape int64 tensor that DP / micro-batch / CP slicing carries along with the
tokens, and from which everything the attention needs is derived on the host, before any copy to the
device (no host sync):

- :meth:`Batch.cu_seqlens` — int32 ``[num_docs + 1]`` offsets over the flattened ``[b * s]`` tokens
  (THD order, rows one after another; every row starts a segment), and the longest segment: what
  megatron's ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=..., max_seqlen_q=...)`` takes;
- :meth:`Batch.document_ids` — ``[b, s]`` 0-based segment index within each row (Lightning's state
  reset, per-document zigzag under CP).

Sources: indexed / HF (megatron ``GPTDataset`` position ids), ``text`` (the same megatron function on
the packed stream), MQAR (one document per row: ``arange``). ``Batch`` still iterates as the
``(tokens, labels, loss_mask)`` triple the engines take today.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch


@dataclasses.dataclass
class Batch:
    """One DP rank's rows of one step (see the module docstring). All ``[b, s]``, on the host."""

    tokens: torch.Tensor
    """int64 input ids."""
    labels: torch.Tensor
    """int64 next-token targets."""
    loss_mask: torch.Tensor
    """float32, 1 where the label counts in the loss."""
    position_ids: Optional[torch.Tensor] = None
    """int64, 0 at each document start, +1 per token within a document; None (a batch made without
    boundaries, e.g. by a test): each row is one document (``arange``)."""

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        if self.position_ids is None:
            self.position_ids = torch.arange(shape[-1], device=self.tokens.device).expand(shape).contiguous()
        for name in ("labels", "loss_mask", "position_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(getattr(self, name).shape)}, tokens {tuple(shape)}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        # the (tokens, labels, loss_mask) triple of the engines' train_step
        return iter((self.tokens, self.labels, self.loss_mask))

    @classmethod
    def stack(cls, rows: list[dict[str, torch.Tensor]]) -> "Batch":
        """Rows (dicts with ``tokens`` / ``labels`` / ``loss_mask`` / ``position_ids``, each ``[s]``) -> ``[b, s]``."""
        return cls(*(torch.stack([torch.as_tensor(r[k]) for r in rows]).to(dt) for k, dt in
                     (("tokens", torch.long), ("labels", torch.long), ("loss_mask", torch.float32),
                      ("position_ids", torch.long))))

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)))

    def rows(self, start: int, stop: Optional[int] = None) -> "Batch":
        """Rows ``[start:stop]`` (a micro-batch)."""
        return Batch(*(t[start:stop] for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)))

    def document_ids(self) -> torch.Tensor:
        """int64 ``[b, s]``: 0-based index of each token's document within its row."""
        return torch.cumsum((self.position_ids == 0).long(), dim=1) - 1

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(int32 ``[num_docs + 1]`` cumulative document lengths over the flattened ``[b * s]`` tokens,
        every row starting a new segment; the longest segment). Host tensors only: call it before the
        batch moves to the device."""
        if self.position_ids.device.type != "cpu":
            raise ValueError("Batch.cu_seqlens reads the boundaries on the host; call it before Batch.to(device)")
        starts = self.position_ids == 0
        starts[:, 0] = True
        idx = torch.nonzero(starts.reshape(-1)).flatten()
        cu = torch.cat([idx, torch.tensor([self.position_ids.numel()])]).to(torch.int32)
        return cu, int((cu[1:] - cu[:-1]).max())


def position_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, s]`` position ids restarting after every ``eod`` token (megatron's
    ``reset_position_ids``: the EOD is the last token of its document), from megatron-core's own
    ``_get_ltor_masks_and_position_ids`` applied per row."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    return torch.stack([_get_ltor_masks_and_position_ids(row, eod, True, False, False, False)[2] for row in tokens])
