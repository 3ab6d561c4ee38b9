"""Shared set-up of the GPU suite: the device, and shapes (realistic on CUDA, tiny in a CPU dry run)."""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
DRYRUN = not CUDA and os.environ.get("SEQPAR_GPU_DRYRUN") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
# the dry run divides every sequence length by this (and uses 16-token S2 blocks) to stay fast
SHRINK = 32 if DRYRUN else 1


def seq(n: int) -> int:
    """A sequence length of the suite (4K-16K on GPU)."""
    return n // SHRINK


def cu(*bounds: int) -> torch.Tensor:
    """int32 cu_seqlens on the device, scaled like :func:`seq`."""
    return torch.tensor([b // SHRINK for b in bounds], dtype=torch.int32, device=DEVICE)


def block(bs: int) -> int:
    return 16 if DRYRUN else bs
