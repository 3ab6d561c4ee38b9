"""Checkpoints written atomically: every rank that owns a distinct shard (DP rank 0, CP rank 0 of
each TP rank) writes ``<dir>/.tmp_step_N/tp<r>.pt``; after a barrier rank 0 renames the folder to
``step_N`` and atomically rewrites ``latest`` (tmp + rename). A crash leaves the previous checkpoint
intact and ``latest`` pointing at it."""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(ckpt_dir: str | pathlib.Path, step: int, state: dict[str, Any]) -> pathlib.Path:
    """Save ``state`` (model/optimizer/scheduler/rng, this TP rank's shard) as step ``step``."""
    root = pathlib.Path(ckpt_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        tp = parallel_state.get_tensor_model_parallel_rank()
        f = tmp / f"tp{tp}.pt"
        torch.save(state, f.with_suffix(".part"))
        os.replace(f.with_suffix(".part"), f)
    dist.barrier()
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
    dist.barrier()
    return final


def latest(ckpt_dir: str | pathlib.Path) -> Optional[pathlib.Path]:
    """The folder ``latest`` points at, or None."""
    root = pathlib.Path(ckpt_dir)
    ptr = root / "latest"
    if not ptr.exists():
        return None
    return root / ptr.read_text().strip()


def load(path: pathlib.Path) -> dict[str, Any]:
    """This TP rank's shard of a checkpoint folder."""
    f = path / f"tp{parallel_state.get_tensor_model_parallel_rank()}.pt"
    if not f.exists():
        raise ValueError(f"checkpoint {path} has no shard {f.name}; was it written with another "
                         f"parallel.tensor_parallel?")
    return torch.load(f, map_location="cpu", weights_only=False)
