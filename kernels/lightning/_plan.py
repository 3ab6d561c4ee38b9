"""Chunk bookkeeping shared by the Triton launchers.

Every input is handled as varlen: a dense batch ``[b, n, ...]`` is the flat sequence
``[b * n, ...]`` with ``b`` documents of length ``n``. A document of length ``len`` has
``ceil(len / C)`` chunks; chunks are numbered globally in document order.

Plans are built on the device from device tensors (no host data is copied to the device): a
dense shape's plan once per (shape, device), kept in a cache bounded by bytes; a varlen plan once
per ``cu_seqlens`` tensor (every layer of a step passes the same tensor, so a step builds it once),
kept on the tensor itself. The only host read is ``cu_seqlens``' values, once per tensor
(``host_ints``), for the number of chunks (the launch grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from seqpar.kernels._common import BoundedCache, host_ints, per_tensor_cache


@dataclass
class ChunkPlan:
    cu: torch.Tensor              # int32 [docs + 1] token offsets in the flat sequence
    chunk_offsets: torch.Tensor   # int32 [docs + 1] first global chunk of each document
    chunk_indices: torch.Tensor   # int32 [num_chunks, 2] (document, chunk inside the document)
    num_docs: int
    num_chunks: int
    chunk_size: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cu, self.chunk_offsets, self.chunk_indices))


def _chunks(cu: torch.Tensor, num_chunks: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_offsets, chunk_indices) from int32 ``cu`` on its device; ``num_chunks`` (a host int)
    sizes the outputs, so nothing is read back."""
    counts = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
    offsets = torch.zeros_like(cu)
    offsets[1:] = torch.cumsum(counts, 0)
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=cu.device, dtype=torch.int32), counts,
                                  output_size=num_chunks)
    within = torch.arange(num_chunks, device=cu.device, dtype=torch.int32) - offsets[doc.long()]
    return offsets, torch.stack([doc, within], dim=1).to(torch.int32).contiguous()


def make_plan(batch: int, seq: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int,
              device: torch.device) -> ChunkPlan:
    """The chunk plan of a dense ``[batch, seq]`` call or of int32 ``cu_seqlens`` (on ``device``)."""
    if cu_seqlens is None:
        key = (batch, seq, chunk_size, str(torch.device(device)))
        return _DENSE.get_or_build(key, lambda: _dense_plan(batch, seq, chunk_size, torch.device(device)))
    per_tensor = per_tensor_cache(cu_seqlens, "_seqpar_chunk_plans")
    hit = per_tensor.get(chunk_size)
    if hit is None:
        offs = host_ints(cu_seqlens)  # cached per tensor: one read per step, not per layer
        num_chunks = sum(-(-(b - a) // chunk_size) for a, b in zip(offs[:-1], offs[1:]))
        hit = (*_chunks(cu_seqlens, num_chunks, chunk_size), num_chunks)
        per_tensor[chunk_size] = hit
    offsets, indices, num_chunks = hit
    return ChunkPlan(cu_seqlens, offsets, indices, cu_seqlens.numel() - 1, num_chunks, chunk_size)


def _dense_plan(batch: int, seq: int, chunk_size: int, device: torch.device) -> ChunkPlan:
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq
    num_chunks = batch * -(-seq // chunk_size)
    offsets, indices = _chunks(cu, num_chunks, chunk_size)
    return ChunkPlan(cu, offsets, indices, batch, num_chunks, chunk_size)


# dense plans by shape: every layer of a model calls with the same shape (build and place once)
_DENSE = BoundedCache(64 * 2 ** 20, ChunkPlan.nbytes)
