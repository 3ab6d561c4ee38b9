"""Chunk bookkeeping shared by the Triton launchers.

Every input is handled as varlen: a dense batch ``[b, n, ...]`` is the flat sequence
``[b * n, ...]`` with ``b`` documents of length ``n``. A document of length ``len`` has
``ceil(len / C)`` chunks; chunks are numbered globally in document order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from seqpar.kernels._common import host_ints


@dataclass
class ChunkPlan:
    cu: torch.Tensor              # int32 [docs + 1] token offsets in the flat sequence
    chunk_offsets: torch.Tensor   # int32 [docs + 1] first global chunk of each document
    chunk_indices: torch.Tensor   # int32 [num_chunks, 2] (document, chunk inside the document)
    num_docs: int
    num_chunks: int
    chunk_size: int


def make_plan(batch: int, seq: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int,
              device: torch.device) -> ChunkPlan:
    if cu_seqlens is None:
        return _dense_plan(batch, seq, chunk_size, torch.device(device))
    offs = host_ints(cu_seqlens)  # cached per tensor: no sync per layer
    lengths = [offs[i + 1] - offs[i] for i in range(len(offs) - 1)]
    return _build(lengths, cu_seqlens.to(device=device, dtype=torch.int32), chunk_size, device)


@functools.lru_cache(maxsize=32)
def _dense_plan(batch: int, seq: int, chunk_size: int, device: torch.device) -> ChunkPlan:
    # every layer of a model calls with the same shape: build (and copy to the GPU) once
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seq
    return _build([seq] * batch, cu, chunk_size, device)


def _build(lengths: list[int], cu: torch.Tensor, chunk_size: int, device: torch.device) -> ChunkPlan:
    counts = [-(-n // chunk_size) for n in lengths]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    idx = [(d, c) for d, cnt in enumerate(counts) for c in range(cnt)]
    return ChunkPlan(
        cu=cu.contiguous(),
        chunk_offsets=torch.tensor(starts, dtype=torch.int32, device=device),
        chunk_indices=torch.tensor(idx, dtype=torch.int32, device=device).view(-1, 2),
        num_docs=len(lengths),
        num_chunks=starts[-1],
        chunk_size=chunk_size,
    )
