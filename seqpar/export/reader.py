"""Read a seqpar training checkpoint for export: one process, no process group, no optimizer state.

A checkpoint (``seqpar.train.checkpoint``) is a megatron-core ``dist_checkpointing`` folder in the
``torch_dist`` format: every model parameter is stored as its *global* tensor cut into the shards the
ranks wrote, whatever the TP / CP / DP layout was. ``torch.distributed.checkpoint`` can assemble
full tensors in a single process (``no_dist=True``), so export never builds the megatron model and
never needs the layout it was trained at.

A DeepSpeed checkpoint (``seqpar.deepspeed.checkpoint``; its manifest says ``engine: deepspeed``) is
consolidated by DeepSpeed's ``zero_to_fp32`` (per TP rank, the TP shards then merged as megatron-core split
them; ``seqpar.deepspeed.checkpoint.consolidated_fp32_state_dict``) into the ``model.state_dict()`` names of
a TP=1 model, then renamed to the sharded keys above (:func:`to_sharded_keys`).

Before anything is read the folder is checked against its ``manifest.json`` (size and SHA-256 of
every file, ``seqpar.train.integrity.verify``; the same manifest for both engines). Nothing executes code from disk: tensors and the
common state load with ``weights_only=True`` and DCP's ``.metadata`` pickle goes through
``seqpar.train.integrity``'s restricted unpickler; DeepSpeed's files are checked and read weights-only
(``seqpar.deepspeed.checkpoint``).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from seqpar.errors import ConfigError

from seqpar.train.checkpoint import CONFIG_FILE, TOKENIZER_DIR, checkpoint_tokenizer  # noqa: E402  one place
from seqpar.train.integrity import MANIFEST

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
    tokenizer: Any = None
    """The run's ``seqpar.data.Tokenizer`` (its files from ``step_N/tokenizer/``), or None."""
    extra: dict[str, Any] = field(default_factory=dict)


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
    if (p / "metadata.json").is_file() or (p / MANIFEST).is_file():  # dist_checkpointing / any seqpar step folder
        return p
    for ptr in (p / "latest", p / "checkpoints" / "latest"):
        if ptr.is_file():
            return resolve_step_dir(ptr)
    raise ExportError(f"{p} is not a seqpar checkpoint: no {MANIFEST}, no latest, no checkpoints/latest; "
                      f"pass a step_N folder, checkpoints/latest or the run folder")


def _engine(step_dir: pathlib.Path) -> str:
    """Which engine wrote the step folder: the manifest's ``engine`` field (DeepSpeed folders carry
    ``"deepspeed"``; megatron's dist_checkpointing folders have no field)."""
    from seqpar.train import integrity

    try:
        return str(integrity.read_manifest(step_dir).get("engine", "megatron"))
    except integrity.CorruptCheckpointError:
        return "megatron"  # verified (and refused) below


def _verified_metadata(step_dir: pathlib.Path):
    """Check the folder against its manifest (size + SHA-256 of every file), then read the DCP
    index through the restricted unpickler (``seqpar.train.integrity``)."""
    from seqpar.train import integrity

    try:
        integrity.verify(step_dir)
        return integrity.read_dcp_metadata(step_dir / ".metadata")
    except (integrity.CorruptCheckpointError, integrity.UnsafeCheckpointError) as e:
        raise ExportError(f"{e}; export refuses a damaged or incomplete checkpoint (copy the whole step folder)") from e


def _read_recipe(step_dir: pathlib.Path, common: dict) -> dict:
    for name in (CONFIG_FILE,):
        f = step_dir / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ExportError(f"{f} is not valid JSON ({e}); the checkpoint's recipe is damaged") from e
    cfg = common.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ExportError(f"{step_dir} carries no recipe (no {CONFIG_FILE} and no config in common.pt); export needs "
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
    from seqpar.train import integrity

    step_dir = resolve_step_dir(path)
    if _engine(step_dir) == "deepspeed":
        return _read_deepspeed(step_dir, with_tensors)
    _verified_metadata(step_dir)  # manifest, then the DCP index through the restricted unpickler
    try:
        common = integrity.load_common(step_dir)
    except Exception as e:  # noqa: BLE001 - a damaged file: say which
        raise ExportError(f"{step_dir}/common.pt cannot be read ({e}); the checkpoint is damaged") from e
    config = _read_recipe(step_dir, common)
    ck = TrainingCheckpoint(path=step_dir, step=int(common.get("step", 0)), config=config,
                            layout=dict(common.get("layout", {})), tensors={}, tokenizer=checkpoint_tokenizer(step_dir))
    if not with_tensors:
        return ck
    try:
        sd = integrity.load_full_tensors(step_dir, skip_prefixes=_OPTIONAL_KEYS)
    except Exception as e:  # noqa: BLE001 - DCP wraps per-item failures; name the folder
        raise ExportError(f"reading the tensors of {step_dir} failed ({type(e).__name__}: {e}); "
                          f"the checkpoint is damaged") from e
    ck.tensors = sd
    return ck


def to_sharded_keys(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` names of a TP=1 GPTModel -> the checkpoint's sharded keys (what
    :func:`read_checkpoint` returns for dist_checkpointing folders): layer norms under their
    sharded names, Lightning's ``linear_qkvg`` split into q / k / v / gate; ``_extra_state`` dropped."""
    from seqpar.export.convert import spec_from_recipe

    vocab = int(sd["embedding.word_embeddings.weight"].shape[0])
    spec = spec_from_recipe(config, vocab)
    d, h, g = spec.head_dim, spec.num_heads, spec.num_kv_heads
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_extra_state") or not torch.is_tensor(v):
            continue
        if k.endswith(".input_layernorm.weight"):
            out[k.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")] = v
        elif k.endswith(".pre_mlp_layernorm.weight"):
            out[k.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")] = v
        elif k.endswith(".self_attention.linear_qkvg.weight"):
            for name, part in zip(("q", "k", "v", "gate"), torch.split(v, [h * d, g * d, g * d, h * d])):
                out[f"{k}.{name}"] = part
        else:
            out[k] = v
    return out


def _read_deepspeed(step_dir: pathlib.Path, with_tensors: bool) -> TrainingCheckpoint:
    """A ``seqpar.deepspeed`` checkpoint: manifest-verified, consolidated to full fp32 tensors by
    DeepSpeed's ZeRO tooling and merged over TP (``consolidated_fp32_state_dict``, weights-only reads),
    in one process, at any saved TP x CP x DP layout."""
    from seqpar.train import integrity

    try:
        from seqpar.deepspeed import checkpoint as dsck
    except ImportError as e:
        raise ExportError(f"{step_dir} is a DeepSpeed checkpoint; install seqpar[deepspeed] to export it ({e})") from e
    try:
        manifest = dsck.verify(step_dir)
    except ValueError as e:
        raise ExportError(f"{e}; export refuses a damaged or incomplete checkpoint (copy the whole step folder)") from e
    config = _read_recipe(step_dir, {})
    ck = TrainingCheckpoint(path=step_dir, step=int(manifest.get("step", 0)), config=config,
                            layout=dict(manifest.get("layout", {})), tensors={}, tokenizer=checkpoint_tokenizer(step_dir),
                            extra={"engine": "deepspeed", "zero_stage": manifest.get("zero_stage")})
    if with_tensors:
        try:
            sd = dsck.consolidated_fp32_state_dict(step_dir)
        except (integrity.UnsafeCheckpointError, integrity.CorruptCheckpointError) as e:
            raise ExportError(f"{e}; export refuses it") from e
        except ValueError as e:  # an older TP > 1 checkpoint without tp_split, inconsistent TP ranks
            raise ExportError(str(e)) from e
        ck.tensors = to_sharded_keys(sd, config)
    return ck


__all__ = ["ExportError", "TOKENIZER_DIR", "TrainingCheckpoint", "read_checkpoint", "resolve_step_dir"]
