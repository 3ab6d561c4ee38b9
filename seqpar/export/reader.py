"""Read a seqpar training checkpoint for export: one process, no process group, no optimizer state.

A checkpoint (``seqpar.train.checkpoint``) is a megatron-core ``dist_checkpointing`` folder in the
``torch_dist`` format: every model parameter is stored as its *global* tensor cut into the shards the
ranks wrote, whatever the TP / CP / DP layout was. ``torch.distributed.checkpoint`` can assemble
full tensors in a single process (``no_dist=True``), so export never builds the megatron model and
never needs the layout it was trained at.

Nothing here executes code from disk: tensors load with ``torch.load(weights_only=True)`` (DCP's
reader), the common state likewise, and DCP's ``.metadata`` pickle goes through an unpickler that
only admits DCP's metadata classes.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from seqpar.errors import ConfigError

from seqpar.train.checkpoint import TOKENIZER_FILE  # noqa: E402  one place for the name
_OPTIONAL_KEYS = ("optimizer.", "rng_state", "rng.")  # rng.*: per-rank RNG states as uint8 tensors (h16)


class ExportError(ConfigError):
    """Bad input to export / import: names the file or field and the fix."""


@dataclass
class TrainingCheckpoint:
    """What export needs from one ``step_N`` folder."""

    path: pathlib.Path
    step: int
    config: dict
    layout: dict
    tensors: dict[str, torch.Tensor]
    tokenizer_model: Optional[bytes] = None
    extra: dict[str, Any] = field(default_factory=dict)


_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
}
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                 "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or module in _SAFE_MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not a "
                                     f"torch.distributed.checkpoint metadata type; refusing to load it")


def resolve_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """``step_N`` folder for a step folder, a ``latest`` pointer file, a checkpoints folder (with
    ``latest``) or a run folder (``<run>/checkpoints/latest``)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ExportError(f"checkpoint {p} does not exist; pass a step_N folder, checkpoints/latest or the run folder")
    if p.is_file():
        if p.name != "latest":
            raise ExportError(f"{p} is a file; pass a step_N folder, checkpoints/latest or the run folder")
        target = p.parent / p.read_text().strip()
        if not target.is_dir():
            raise ExportError(f"{p} points at {target.name}, which does not exist under {p.parent}")
        return resolve_step_dir(target)
    if (p / "metadata.json").is_file():
        return p
    for ptr in (p / "latest", p / "checkpoints" / "latest"):
        if ptr.is_file():
            return resolve_step_dir(ptr)
    raise ExportError(f"{p} is not a seqpar checkpoint: no metadata.json, no latest, no checkpoints/latest; "
                      f"pass a step_N folder, checkpoints/latest or the run folder")


def _read_metadata(step_dir: pathlib.Path):
    meta = step_dir / ".metadata"
    if not meta.is_file():
        raise ExportError(f"{step_dir} has no .metadata (torch_dist index); the checkpoint is incomplete")
    try:
        return _MetadataUnpickler(io.BytesIO(meta.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ExportError(f"{meta} cannot be read ({e}); the checkpoint is truncated or not a torch_dist checkpoint") from e


def _check_shards(step_dir: pathlib.Path, md) -> None:
    """Every shard file the index names exists and is long enough for the bytes it must hold."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = step_dir / rel
        if not f.is_file():
            raise ExportError(f"checkpoint shard {f} is missing; the checkpoint is incomplete (copy the whole "
                              f"step folder)")
        have = f.stat().st_size
        if have < size:
            raise ExportError(f"checkpoint shard {f} is truncated ({have} bytes, the index needs {size}); "
                              f"the checkpoint is incomplete")


def _verify_manifest(step_dir: pathlib.Path) -> None:
    """Checksums from the checkpoint's manifest, when the training side writes one."""
    try:
        from seqpar.train import checkpoint as ck
    except Exception:  # noqa: BLE001 - export without the training extras: shard checks only
        return
    verify = getattr(ck, "verify", None)
    if verify is None:
        return
    try:
        verify(step_dir)
    except FileNotFoundError:
        return  # written before manifests existed
    except ValueError as e:
        raise ExportError(str(e)) from e


def _read_recipe(step_dir: pathlib.Path, common: dict) -> dict:
    for name in ("recipe.json", "config.json"):
        f = step_dir / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ExportError(f"{f} is not valid JSON ({e}); the checkpoint's recipe is damaged") from e
    cfg = common.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ExportError(f"{step_dir} carries no recipe (no recipe.json and no config in common.pt); export needs "
                          f"the model section the run was trained with — re-save the checkpoint with seqpar.train")
    return cfg


def read_checkpoint(path: str | pathlib.Path, *, with_tensors: bool = True) -> TrainingCheckpoint:
    """Load the model tensors (full, global shapes) and the metadata of a training checkpoint.

    Args:
        path: step folder, ``checkpoints/latest``, a checkpoints folder or the run folder.
        with_tensors: False reads only config / step / layout / tokenizer (cheap).

    Raises:
        ExportError: not a checkpoint, missing recipe, missing or truncated shard, bad checksum.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = resolve_step_dir(path)
    common_file = step_dir / "common.pt"
    if not common_file.is_file():
        raise ExportError(f"{step_dir} has no common.pt (step, layout, recipe); the checkpoint is incomplete")
    try:
        common = torch.load(common_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file: say which
        raise ExportError(f"{common_file} cannot be read ({e}); the checkpoint is damaged") from e
    config = _read_recipe(step_dir, common)
    md = _read_metadata(step_dir)
    _check_shards(step_dir, md)
    _verify_manifest(step_dir)
    tok = step_dir / TOKENIZER_FILE
    ck = TrainingCheckpoint(path=step_dir, step=int(common.get("step", 0)), config=config,
                            layout=dict(common.get("layout", {})),
                            tensors={}, tokenizer_model=tok.read_bytes() if tok.is_file() else None)
    if not with_tensors:
        return ck
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and not k.startswith(_OPTIONAL_KEYS)}
    try:
        dcp_load(sd, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP wraps per-item failures; name the folder
        raise ExportError(f"reading the tensors of {step_dir} failed ({type(e).__name__}: {e}); "
                          f"the checkpoint is damaged") from e
    ck.tensors = sd
    return ck


__all__ = ["ExportError", "TOKENIZER_FILE", "TrainingCheckpoint", "read_checkpoint", "resolve_step_dir"]
