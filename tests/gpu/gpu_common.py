"""Shared set-up of the GPU suite: the device, and shapes (realistic on CUDA, tiny in a CPU dry run)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from typing import Optional

import torch

CUDA = torch.cuda.is_available()
DRYRUN = not CUDA and os.environ.get("SEQPAR_GPU_DRYRUN") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
# the dry run divides every sequence length by this (and uses 16-token S2 blocks) to stay fast
SHRINK = 32 if DRYRUN else 1
# one GPU cannot host two NCCL ranks (each rank needs its own device)
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2
NEEDS_TWO_GPUS = "the CP code on NCCL needs >= 2 GPUs: one GPU cannot host two NCCL ranks"


def seq(n: int) -> int:
    """A sequence length of the suite (4K-16K on GPU)."""
    return n // SHRINK


def long_seq(n: int) -> int:
    """A long-context length (64K / 128K tokens per call on GPU; 512 in the dry run)."""
    return n if not DRYRUN else 512


def heads(n: int) -> int:
    """A head count of the long-context launches (up to 64 on GPU; 2 in the dry run)."""
    return n if not DRYRUN else min(n, 2)


def cu(*bounds: int) -> torch.Tensor:
    """int32 cu_seqlens on the device, scaled like :func:`seq`."""
    return torch.tensor([b // SHRINK for b in bounds], dtype=torch.int32, device=DEVICE)


def block(bs: int) -> int:
    return 16 if DRYRUN else bs


def nvidia_hardware() -> Optional[str]:
    """NVIDIA GPU hardware seen without torch (device files ``/dev/nvidia<N>`` or ``nvidia-smi -L``):
    a one-line description, or None. ``SEQPAR_NVIDIA_DEVICE_GLOB`` overrides the device-file glob."""
    found = sorted(glob.glob(os.environ.get("SEQPAR_NVIDIA_DEVICE_GLOB", "/dev/nvidia[0-9]*")))
    if found:
        return "device files " + ", ".join(found[:4])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0 and "GPU " in out.stdout:
            return out.stdout.strip().splitlines()[0]
    return None
