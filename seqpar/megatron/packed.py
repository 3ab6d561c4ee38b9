"""The step's CP partition, carried to every attention layer with megatron's ``PackedSeqParams``.

The trainer resolves one :class:`seqpar.cp.Partition` per micro-batch on the host (``cp.make_partition``
from the batch's ``cu_seqlens``, with the recipe's ``parallel.cp_balance``: Megatron's zigzag or the
joint cost balancer) and hands it to the model inside :class:`SeqparPackedSeqParams` — megatron-core
passes ``packed_seq_params`` unchanged from ``GPTModel.forward`` through every transformer layer to
self-attention and the core-attention slot, and activation recompute saves it with the other
arguments, so every layer of the micro-batch (recomputed ones included) sees the same object.
:func:`partition_of` is the one place a layer gets its partition: the attached one, or, for a plain
``PackedSeqParams`` / no packed params, Megatron's zigzag resolved from the boundaries (cached: the
same object for every layer). docs/cp.md, "Packed documents: the trainer contract".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from seqpar import cp
from seqpar.cp.partition import cached_index
from seqpar.kernels._common import host_ints

__all__ = ["SeqparPackedSeqParams", "packed_cu_seqlens", "partition_of", "rope_positions"]


@dataclass
class SeqparPackedSeqParams(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` (THD) plus the micro-batch's CP ``partition``: which global
    tokens each CP rank holds (``cp.make_partition(..., balance=parallel.cp_balance)``), built once on
    the host per micro-batch. ``None``: Megatron's zigzag of the boundaries."""

    partition: Optional[cp.Partition] = None


def packed_cu_seqlens(packed_seq_params: Optional[PackedSeqParams]) -> dict[str, torch.Tensor]:
    """``cu_seqlens`` (and ``cu_seqlens_unpadded``) of a packed THD batch for ``cp.attention`` and the
    kernels: the *global* boundaries of the whole packed sequence (every CP rank passes the same).
    With Megatron's padded documents (``cu_seqlens_q_padded`` differs from ``cu_seqlens_q``) the padded
    ones are the layout and the real ones mark the pads (no real tokens); otherwise ``cu_seqlens_q``
    are the documents, of any length. Host values are read once per tensor (cached on it)."""
    if packed_seq_params is None:
        return {}
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}")
    real, padded = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_q_padded
    if real is None:
        raise ValueError("packed_seq_params.cu_seqlens_q must hold the documents' boundaries (int32 [docs + 1])")
    if padded is None or padded is real or host_ints(padded) == host_ints(real):
        return {"cu_seqlens": real.to(torch.int32)}
    return {"cu_seqlens": padded.to(torch.int32), "cu_seqlens_unpadded": real.to(torch.int32)}


def _rank_world(group: Any) -> tuple[int, int]:
    return (0, 1) if group is None or group.size() == 1 else (group.rank(), group.size())


def partition_of(packed_seq_params: Optional[PackedSeqParams], local_len: int, group: Any) -> cp.Partition:
    """The partition of this micro-batch over the CP ``group`` (``local_len``: this rank's tokens):
    the one attached to :class:`SeqparPackedSeqParams`, else Megatron's zigzag of the packed
    boundaries (per document), else of ``local_len x CP`` tokens (one sequence per row). Host only;
    resolved partitions are cached, so every layer gets the same object."""
    rank, world = _rank_world(group)
    part = getattr(packed_seq_params, "partition", None)
    if part is not None:
        if not isinstance(part, cp.Partition):
            raise ValueError(f"packed_seq_params.partition must be a seqpar.cp.Partition, got {type(part).__name__}")
        if (part.world, part.local_len) != (world, local_len):
            raise ValueError(f"packed_seq_params.partition is for {part.world} CP ranks x {part.local_len} tokens; "
                             f"this layer runs {world} x {local_len}: build it with the CP group of the model "
                             f"and the micro-batch's cu_seqlens")
        return part
    cu = packed_cu_seqlens(packed_seq_params)
    if not cu:
        return cp.make_partition(local_len * world, (rank, world))
    return cp.make_partition(host_ints(cu["cu_seqlens"])[-1], (rank, world), local_len=local_len,
                             cu_seqlens=cu["cu_seqlens"], cu_seqlens_unpadded=cu.get("cu_seqlens_unpadded"))


def rope_positions(part: cp.Partition, rank: int, table_len: int, device: torch.device) -> torch.Tensor:
    """int64 ``[local_len]`` on ``device``: the row of the rotary table each of ``rank``'s slots uses,
    from the partition's token index (any balancer). A table of exactly ``part.seq_len`` rows is
    indexed by global offset (megatron's "exact mapping"), any other by the position inside the
    token's document (megatron-core's ``_apply_rotary_pos_emb_thd``); internal padding slots use row 0.
    Built on the host once per (partition, rank, table) and cached on the device: no host sync or
    copy per layer."""

    def build() -> torch.Tensor:
        idx = part.token_index(rank)
        real = idx.clamp_min(0)
        if table_len == part.seq_len:
            pos = real
        else:
            bounds = torch.tensor(part.doc_bounds or (0, part.seq_len), dtype=torch.int64)
            doc = torch.searchsorted(bounds[1:], real, right=True)
            pos = real - bounds[doc]
        return torch.where(idx >= 0, pos, 0)

    return cached_index(("rope_positions", part, rank, table_len), device, build)
