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

:meth:`Batch.to` reads the boundaries on the host *before* the copy and carries them with the device
batch (``doc_starts``: host ints), so the engines derive each micro-batch's ``cu_seqlens`` from a
device batch without a host sync. :meth:`Batch.whole_rows` drops the boundaries (``data.document_mask``
false: every row one document, attention across EOD).

Sources: indexed / HF (megatron ``GPTDataset`` position ids), ``text`` (the same megatron function on
the packed stream), MQAR (one document per row: ``arange``). ``Batch`` also iterates as the
``(tokens, labels, loss_mask)`` triple.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch


@dataclasses.dataclass
class Batch:
    """One DP rank's rows of one step (see the module docstring). All ``[b, s]``, on the host (on the
    engine's device after :meth:`to`)."""

    tokens: torch.Tensor
    """int64 input ids."""
    labels: torch.Tensor
    """int64 next-token targets."""
    loss_mask: torch.Tensor
    """float32, 1 where the label counts in the loss."""
    position_ids: Optional[torch.Tensor] = None
    """int64, 0 at each document start, +1 per token within a document; None (a batch made without
    boundaries, e.g. by a test): each row is one document (``arange``)."""
    doc_starts: Optional[tuple[tuple[int, ...], ...]] = dataclasses.field(default=None, repr=False, compare=False)
    """Host copy of the boundaries: per row, the columns where a document starts (0 first). Filled
    without a host read where it is known (no ``position_ids`` given; :meth:`to` reads them on the host
    before the copy); None: read from ``position_ids`` when first needed (:meth:`starts`)."""

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        if self.position_ids is None:
            self.position_ids = torch.arange(shape[-1], device=self.tokens.device).expand(shape).contiguous()
            if self.doc_starts is None and len(shape) == 2:
                self.doc_starts = ((0,),) * shape[0]
        for name in ("labels", "loss_mask", "position_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(getattr(self, name).shape)}, tokens {tuple(shape)}")
        if self.doc_starts is not None and len(self.doc_starts) != shape[0]:
            raise ValueError(f"Batch.doc_starts has {len(self.doc_starts)} rows, tokens {shape[0]}")

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
        """The batch on ``device``, with the document boundaries read here first (on the host, before
        the copy: a batch from a data source costs no host sync afterwards)."""
        starts = self.doc_starts if self.doc_starts is not None or self.position_ids.device.type != "cpu" \
            else self.starts()
        return Batch(*(t.to(device) for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)),
                     doc_starts=starts)

    def rows(self, start: int, stop: Optional[int] = None) -> "Batch":
        """Rows ``[start:stop]`` (a micro-batch)."""
        return Batch(*(t[start:stop] for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)),
                     doc_starts=None if self.doc_starts is None else self.doc_starts[start:stop])

    def whole_rows(self) -> "Batch":
        """The same tokens with every row one document (``position_ids`` = ``arange``): no document
        masking (``data.document_mask: false``)."""
        return Batch(self.tokens, self.labels, self.loss_mask)

    def starts(self) -> tuple[tuple[int, ...], ...]:
        """Per row, the columns where a document starts (host ints, cached). Known without a host read
        for a batch from :meth:`to` or made without ``position_ids``; otherwise read from
        ``position_ids`` once (a device-to-host copy when they live on a GPU)."""
        if self.doc_starts is None:
            first = self.position_ids.detach() == 0
            first[:, 0] = True
            rows: list[list[int]] = [[] for _ in range(first.shape[0])]
            for r, c in torch.nonzero(first.cpu()).tolist():
                rows[r].append(c)
            self.doc_starts = tuple(tuple(r) for r in rows)
        return self.doc_starts

    def document_ids(self) -> torch.Tensor:
        """int64 ``[b, s]``: 0-based index of each token's document within its row."""
        return torch.cumsum((self.position_ids == 0).long(), dim=1) - 1

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(int32 ``[num_docs + 1]`` cumulative document lengths over the flattened ``[b * s]`` tokens,
        every row starting a new segment; the longest segment), a host tensor built from the host
        boundaries (:meth:`starts`: no host sync for a batch of the loop, on any device)."""
        seq = self.tokens.shape[1]
        vals = [r * seq + c for r, row in enumerate(self.starts()) for c in row] + [self.tokens.numel()]
        cu = torch.tensor(vals, dtype=torch.int32)
        return cu, max(b - a for a, b in zip(vals[:-1], vals[1:]))


def position_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, s]`` position ids restarting after every ``eod`` token (megatron's
    ``reset_position_ids``: the EOD is the last token of its document), from megatron-core's own
    ``_get_ltor_masks_and_position_ids`` applied per row."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    return torch.stack([_get_ltor_masks_and_position_ids(row, eod, True, False, False, False)[2] for row in tokens])
