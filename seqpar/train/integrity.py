"""Checkpoint integrity and safe loading: nothing read from a checkpoint can run code, and a changed,
truncated or missing file is found before anything is loaded.

Trust model. A checkpoint folder is data, not code. seqpar reads it with:

- ``manifest.json`` (JSON): size + SHA-256 of every other file of the folder, written inside the
  temporary folder before the atomic rename, so a complete checkpoint always has one. ``verify``
  re-hashes the files and names the first one that is changed, truncated, missing or unexpected.
  The manifest detects corruption (disk, copy, a crash); it is no signature: whoever can write the
  folder can rewrite it. That is why the loading below is safe on its own as well:
- DCP's ``.metadata`` (a pickle written by torch.distributed.checkpoint) through ``SafeUnpickler``,
  which resolves only the classes DCP itself writes (its metadata dataclasses, ``torch.Size``,
  dtypes, layouts, memory formats) and refuses everything else — a crafted ``.metadata`` raises
  ``UnsafeCheckpointError("refusing to unpickle builtins.exec ...")`` before any of it is built;
  the storage paths it names must be plain file names inside the folder;
- tensors of the ``.distcp`` files and ``common.pt`` through ``torch.load(weights_only=True)``
  (torch's restricted unpickler: tensors, containers, numbers, strings), explicitly, whatever the
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment says; byte items (megatron ``ShardedObject``)
  the same way;
- RNG states are tensors (uint8), the recipe and our metadata are JSON;
- files that a third-party loader reads (DeepSpeed's checkpoints, ``seqpar.deepspeed.checkpoint``):
  ``check_pickle_globals`` first (the pickle is disassembled, not run, and refused if it names a global
  outside torch's weights-only set and the format's allow-list), then the loader itself runs inside
  ``forced_weights_only`` (torch's restricted unpickler even where the loader passes
  ``weights_only=False``); our own reads of such files use ``weights_only_load(..., allow=)``.

Both engines' checkpoints carry the same ``manifest.json`` (``write_manifest`` / ``verify``; a DeepSpeed
folder adds ``engine``, ``step``, ``layout`` and ``zero_stage``).

``SafeTorchDistLoadShardedStrategy`` / ``SafeCommonLoadStrategy`` plug all of this into
``megatron.core.dist_checkpointing.load(..., sharded_strategy=, common_strategy=)``; ``safe_load``
is that call. Readers outside training (the HF exporter) call ``verify(folder)`` first, then
``safe_load`` / ``load_common``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
from typing import Any, Iterable, Iterator, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asked to unpickle something that is not plain data."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file does not match the manifest written with it (``.file`` names it)."""

    def __init__(self, folder: pathlib.Path, file: str, reason: str) -> None:
        self.folder, self.file, self.reason = pathlib.Path(folder), file, reason
        super().__init__(f"checkpoint {folder} is corrupt: {file}: {reason}")


# ---------------------------------------------------------------------------------------------------
# restricted unpickling

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData", "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: only the classes torch.distributed.checkpoint writes there, plus torch
    dtypes / layouts / memory formats by name. Anything else raises UnsafeCheckpointError without
    being imported or called."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name} from {self.source}: not a class that "
                                    f"torch.distributed.checkpoint writes (the file may be crafted; do not load it)")


def read_dcp_metadata(path: str | os.PathLike, source: Optional[str] = None) -> Metadata:
    """Read a DCP ``.metadata`` file with ``SafeUnpickler``; its storage paths must be plain file names."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        try:
            md = SafeUnpickler(f, source or str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # truncated / garbage
            raise CorruptCheckpointError(path.parent, path.name, f"unreadable DCP metadata ({e})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"refusing {path}: it unpickles to {type(md).__name__}, not DCP Metadata")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or pathlib.PurePath(rel).name != rel or rel in ("", ".", ".."):
            raise UnsafeCheckpointError(f"refusing {path}: storage path {rel!r} is not a file inside the checkpoint")
    return md


_NOT_WRITTEN = "not a class this checkpoint format writes (the file may be crafted; do not load it)"


def refused_unpickling(e: BaseException, source: str) -> "UnsafeCheckpointError":
    """torch's weights-only refusal as our error: the refused global and the file, without torch's advice
    to allow-list it."""
    text = str(e)
    m = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if m is None:
        lines = text.strip().splitlines()
        return UnsafeCheckpointError(f"refusing to unpickle {source}: {lines[0].strip() if lines else text}")
    name = m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"  # torch drops the builtins. prefix
    return UnsafeCheckpointError(f"refusing to unpickle {name} from {source}: {_NOT_WRITTEN}")


def _allowing(allow: Iterable[Any]) -> Any:
    """``torch.serialization.safe_globals`` for the entries of ``allow`` not yet allowed: torch's context
    removes its entries on exit even when an enclosing context had added them, so nested uses (our
    checkpoint engine inside ``forced_weights_only``) must not re-add what is already there."""
    have = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([g for g in allow if g not in have])


def weights_only_load(data: Any, source: str, *, allow: Iterable[Any] = (), **kw: Any) -> Any:
    """``torch.load(data, weights_only=True, **kw)``: torch's restricted unpickler (tensors, containers,
    numbers, strings) plus the classes in ``allow`` (e.g. the few DeepSpeed writes into its optimizer
    files), for this call only. Anything else raises UnsafeCheckpointError naming ``source`` and the
    refused global, without importing or calling it."""
    try:
        with _allowing(allow):
            return torch.load(data, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise refused_unpickling(e, source) from None


def check_pickle_globals(path: str | os.PathLike, *, allow: Iterable[Any] = (), source: Optional[str] = None) -> None:
    """Refuse a ``torch.save`` file whose pickle names a global outside torch's weights-only set and
    ``allow``, before any loader sees it: the pickle is disassembled, not run
    (``torch.serialization.get_unsafe_globals_in_checkpoint``). For files a third-party loader will read
    (DeepSpeed's): the clear, early error; the loads themselves still run weights-only
    (:func:`forced_weights_only`), which is what makes them safe. Files in torch's legacy (non-zip)
    format are not scanned here."""
    with _allowing(allow):
        try:
            bad = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except ValueError:  # legacy format: left to the weights-only load
            return
        except Exception as e:  # noqa: BLE001 - truncated / garbage zip
            raise CorruptCheckpointError(pathlib.Path(path).parent, pathlib.Path(path).name,
                                         f"not a readable torch.save file ({e.__class__.__name__})") from None
    if bad:
        raise UnsafeCheckpointError(f"refusing to unpickle {bad[0]} from {source or path}: {_NOT_WRITTEN}")


@contextlib.contextmanager
def forced_weights_only(allow: Iterable[Any] = (), source: str = "a checkpoint") -> Iterator[None]:
    """Every ``torch.load`` inside runs weights-only with ``allow`` added, even one that passes
    ``weights_only=False`` (torch's own switch, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at each call;
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is lifted meanwhile). For third-party loaders that call
    ``torch.load(weights_only=False)`` themselves (DeepSpeed's; see seqpar.deepspeed.checkpoint). The
    variables are process-wide for the duration (child processes inherit them). A refused global
    raises UnsafeCheckpointError naming ``source``."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with _allowing(allow):
            yield
    except pickle.UnpicklingError as e:
        raise refused_unpickling(e, f"a file of {source}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with ``.metadata`` read by ``read_dcp_metadata`` (cached, like
    megatron's CachedMetadataFileSystemReader)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._cached: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            md = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._cached = md
        return self._cached


class _SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """Byte items (ShardedObjects) through torch's weights-only unpickler instead of plain pickle."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = weights_only_load(value, f"checkpoint object {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeTorchDistLoadShardedStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's ``torch_dist`` load strategy with the safe reader and planner (same steps as
    ``TorchDistLoadShardedStrategy.load`` in megatron-core 0.16)."""

    def load(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
        m = mcore_torch
        flexible = [t for t in m.nested_values(sharded_state_dict)
                    if isinstance(t, m.ShardedTensor) and not t.allow_shape_mismatch]
        mismatch = {t.key: t for t in m.nested_values(sharded_state_dict)
                    if isinstance(t, m.ShardedTensor) and t.allow_shape_mismatch}
        orig = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = m._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt = m.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        reader.read_metadata()  # a crafted .metadata is refused here, before DCP plans anything
        planner = _SafeLoadPlanner(shapes_validation_sharded_tensors=flexible,
                                   allow_shape_mismatch_sharded_tensors=mismatch)
        try:
            dcp.load(pyt, storage_reader=reader, planner=planner)
        except CheckpointException as e:  # DCP gathers every rank's failure; surface ours as is
            for exc, _ in e.failures.values():
                if isinstance(exc, (UnsafeCheckpointError, CorruptCheckpointError)):
                    raise exc from None
            raise
        self.cached_global_metadata = reader.read_metadata()
        out = {k: m._unwrap_pyt_sharded_tensor(v) for k, v in pyt.items()}
        out = m._replace_sharded_keys_with_state_dict_keys(out, flat_mapping, rename_mapping)
        m._restore_dict_types(out, orig)
        return out

    def load_tensors_metadata(self, checkpoint_dir: Any, metadata: Optional[Metadata] = None) -> Any:
        return super().load_tensors_metadata(checkpoint_dir, metadata or SafeFileSystemReader(checkpoint_dir)
                                             .read_metadata())

    def load_sharded_metadata(self, checkpoint_dir: Any) -> Any:
        md = SafeFileSystemReader(checkpoint_dir).read_metadata()
        out = {}
        for key, smd in md.state_dict_metadata.items():
            if isinstance(smd, BytesStorageMetadata):
                obj = mcore_torch.ShardedObject.empty_from_unique_key(key)
                out[obj.unique_key] = obj
        out.update(self.load_tensors_metadata(checkpoint_dir, md))
        return out


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` and per-object ``.pt`` files through ``torch.load(weights_only=True)``."""

    def load_common(self, checkpoint_dir: Any) -> Any:
        path = pathlib.Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CorruptCheckpointError(pathlib.Path(checkpoint_dir), COMMON_STATE_FNAME, "missing")
        return weights_only_load(str(path), str(path), map_location="cpu")

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        def one(obj: Any) -> Any:
            if not isinstance(obj, ShardedObject):
                return obj
            path = pathlib.Path(checkpoint_dir) / f"{obj.unique_key}.pt"
            return weights_only_load(str(path), str(path))

        return dict_list_map_inplace(one, sharded_objects_state_dict)


def safe_load(sharded_state_dict: Any, folder: str | os.PathLike, **kw: Any) -> Any:
    """``dist_checkpointing.load`` through the safe strategies (no unrestricted unpickling)."""
    return dist_checkpointing.load(sharded_state_dict, str(folder), sharded_strategy=SafeTorchDistLoadShardedStrategy(),
                                   common_strategy=SafeCommonLoadStrategy(), **kw)


def load_common(folder: str | os.PathLike) -> dict[str, Any]:
    """The common (rank-0) values of a dist_checkpointing folder, read safely."""
    return SafeCommonLoadStrategy().load_common(folder)


def load_full_tensors(folder: str | os.PathLike, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch_dist`` folder as its full (global) tensor, in ONE process without a
    process group (DCP ``no_dist``, any saved TP / PP / CP layout), read through
    ``SafeFileSystemReader``; keys starting with one of ``skip_prefixes`` are not read (used by the
    HF exporter: model tensors only). CPU tensors in the saved dtypes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = pathlib.Path(folder)
    md = read_dcp_metadata(folder / ".metadata")
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and not k.startswith(tuple(skip_prefixes))}
    dcp.load(sd, storage_reader=SafeFileSystemReader(folder), no_dist=True)
    return sd


# ---------------------------------------------------------------------------------------------------
# manifest


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike, digests: Optional[dict[str, dict[str, Any]]] = None,
                   extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write ``<folder>/manifest.json`` listing every file of ``folder`` with its size and SHA-256.
    ``digests`` holds entries already computed elsewhere (each rank hashes the files it wrote);
    the remaining files are hashed here. Written by tmp + rename."""
    folder = pathlib.Path(folder)
    digests = dict(digests or {})
    files = {name: digests.get(name) or file_digest(folder / name) for name in _files(folder)}
    manifest = {"format": "seqpar-manifest-1", "algorithm": "sha256", "files": files, **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = pathlib.Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptCheckpointError(folder, MANIFEST, "missing (an incomplete save, or not written by seqpar)")
    try:
        m = json.loads(path.read_text())
        files = m["files"]
        assert isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
    except Exception as e:
        raise CorruptCheckpointError(folder, MANIFEST, f"unreadable ({e.__class__.__name__})") from None
    return m


def verify(folder: str | os.PathLike, only: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Check every file of a checkpoint folder against its manifest (``only``: a subset of the
    manifest's file names, e.g. this rank's share). Raises CorruptCheckpointError naming the first
    missing, truncated, changed or unlisted file; returns the manifest when the folder is intact.

    For readers of a checkpoint (resume, the HF exporter): call it before loading."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CorruptCheckpointError(folder, ".", "no such checkpoint folder")
    manifest = read_manifest(folder)
    files = manifest["files"]
    if only is None:
        extra = sorted(set(_files(folder)) - set(files))
        if extra:
            raise CorruptCheckpointError(folder, extra[0], "not in the manifest (added after the save)")
    for name in sorted(files if only is None else only):
        want = files[name]
        path = folder / name
        if not path.is_file():
            raise CorruptCheckpointError(folder, name, "missing")
        size = path.stat().st_size
        if size != want.get("size"):
            raise CorruptCheckpointError(folder, name, f"{'truncated' if size < want.get('size', 0) else 'grown'}: "
                                                       f"{size} bytes, the manifest says {want.get('size')}")
        if file_digest(path)["sha256"] != want.get("sha256"):
            raise CorruptCheckpointError(folder, name, "contents changed (SHA-256 differs from the manifest)")
    return manifest


def manifest_files(folder: str | os.PathLike) -> list[str]:
    return sorted(read_manifest(folder)["files"])
