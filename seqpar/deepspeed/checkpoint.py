"""Checkpoints of the DeepSpeed engine: ``engine.save_checkpoint`` / ``engine.load_checkpoint``
(DeepSpeed's own format, ZeRO shards included), written atomically like ``seqpar.train.checkpoint``.

Layout of ``<out_dir>/checkpoints``::

    latest                      text: the tag of the newest complete checkpoint ("step_0000008"),
                                the same file DeepSpeed's own tools (zero_to_fp32) read
    step_0000008/               one DeepSpeed checkpoint folder (tag = folder name)
      mp_rank_00_model_states.pt            module state + client state (step, layout, config)
      *zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO shards (one per DP x CP rank; stage 0: none,
                                            the optimizer state is in the model-states file)
      rng/rank_<global rank>.pt             per-rank RNG states (plain tensors)
      seqpar_manifest.json                  layout, step, size + sha256 of every file above
    zero_to_fp32.py             DeepSpeed's consolidation script (written by DeepSpeed)

Atomicity: every rank saves into ``.tmp_step_N`` (a DeepSpeed tag of its own, ``save_latest=False``);
after a barrier rank 0 writes the manifest, renames the folder to ``step_N`` and rewrites ``latest``
by tmp + rename. A crash leaves the previous checkpoint and ``latest`` intact. Loading verifies the
manifest (sizes and checksums) before DeepSpeed reads anything.

Exact resume: DeepSpeed restores the module, the ZeRO-partitioned fp32 master weights and AdamW
moments and the LR scheduler; ``step`` restores the data position; the RNG files the generators.
A checkpoint written at another DP x CP size (ZeRO partitions differ) is converted once with
DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) into
``step_N.universal/`` and loaded with ``checkpoint.load_universal`` (parameters and optimizer moments
are re-partitioned exactly; RNG states, which are per rank, are not restored).

For the HF exporter, :func:`consolidated_fp32_state_dict` gives one fp32 state dict of the whole
model (DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``), keyed like ``model.state_dict()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from seqpar.train.checkpoint import _write_atomic  # one tmp + os.replace writer for both engines

MANIFEST = "seqpar_manifest.json"


def _layout() -> dict[str, int]:
    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "context_parallel": ps.get_context_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: pathlib.Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def save(engine: Any, ckpt_dir: str | pathlib.Path, step: int, *, rng: Any, config: dict[str, Any],
         keep_last: int = 0) -> pathlib.Path:
    """Write step ``step`` through ``engine.save_checkpoint`` into ``<ckpt_dir>/step_N`` atomically, then
    delete all but the newest ``keep_last`` checkpoints (0 = keep all; train.keep_last) with their
    converted ``.universal`` copies. Collective: every rank calls it."""
    root = pathlib.Path(ckpt_dir)
    tag = f"step_{step:07d}"
    tmp_tag = f".tmp_{tag}"
    final, tmp = root / tag, root / tmp_tag
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    layout = _layout()
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # universal_checkpoint_info: what ds_to_universal needs to re-partition it later (no TP merge
    # patterns: TP shards are not re-split by this path)
    client = {"seqpar": {"step": step, "layout": layout, "config": config},
              UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, client_state=client)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng, tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        manifest = {"format": "seqpar-deepspeed/1", "step": step, "layout": layout,
                    "zero_stage": engine.zero_optimization_stage(), "files": _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        if keep_last > 0:
            from seqpar.train.checkpoint import checkpoints

            for old in [p for p in checkpoints(root)[:-keep_last] if p != final]:
                shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest(ckpt_dir: str | pathlib.Path) -> Optional[pathlib.Path]:
    """The folder ``latest`` points at, or None."""
    ptr = pathlib.Path(ckpt_dir) / "latest"
    return ptr.parent / ptr.read_text().strip() if ptr.exists() else None


def verify(path: pathlib.Path) -> dict[str, Any]:
    """Check a checkpoint folder against its manifest (every file present, sizes and sha256 equal);
    returns the manifest. Raises ValueError naming the first bad file."""
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise ValueError(f"{path} is not a seqpar DeepSpeed checkpoint (no {MANIFEST}); pass a step_N folder "
                         f"written with train.engine=deepspeed")
    manifest = json.loads(man_path.read_text())
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise ValueError(f"checkpoint {path}: {name} does not match its checksum in {MANIFEST} (corrupt or "
                             f"modified)")
    return manifest


def _universal(path: pathlib.Path) -> pathlib.Path:
    """DeepSpeed's universal checkpoint of ``path`` (converted once, by rank 0, atomically)."""
    out = path.with_name(path.name + ".universal")
    if dist.get_rank() == 0 and not (out / "zero").is_dir():
        tmp = path.with_name(f".tmp_{path.name}.universal")
        src = path.with_name(f".tmp_{path.name}.source")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(path, src)
        # megatron-core modules put `_extra_state` entries (None, not tensors) in state_dict(); the
        # converter saves every module entry as a tensor, so the copy it reads has only tensors
        for f in src.glob("mp_rank_*_model_states.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)  # verified by the manifest
            state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
            torch.save(state, f)
        # a subprocess: the converter forks worker pools, which a daemonic rank process may not
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--no_strict"]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
        shutil.rmtree(src, ignore_errors=True)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {path}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def load(engine: Any, path: pathlib.Path) -> dict[str, Any]:
    """Load a ``step_N`` folder into ``engine`` (module, ZeRO optimizer state, LR scheduler). Returns
    ``step``, ``config``, ``layout`` and ``rng`` (this rank's RNG states, or None when the checkpoint
    was written with another parallel layout)."""
    manifest = verify(path)
    same = manifest["layout"] == _layout()
    if manifest["zero_stage"] != engine.zero_optimization_stage():
        raise ValueError(f"checkpoint {path} was written with ZeRO stage {manifest['zero_stage']}; this run has "
                         f"deepspeed.zero_stage={engine.zero_optimization_stage()}; resume with the same stage")
    if same:
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    else:
        uni = _universal(path)
        engine._config.load_universal_checkpoint = True  # DeepSpeed's checkpoint.load_universal switch
        try:
            # not strict: the converted module state has no `_extra_state` entries (see _universal); every
            # parameter is then set from the universal fp32 files
            loaded, client = engine.load_checkpoint(str(uni.parent), tag=uni.name, load_module_strict=False)
        finally:
            engine._config.load_universal_checkpoint = False
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load {path}")
    rng = None
    if same:
        rng = torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=True)
    meta = client["seqpar"] if client and "seqpar" in client else manifest
    return {"step": manifest["step"], "config": meta.get("config"), "layout": manifest["layout"], "rng": rng}


def consolidated_fp32_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the whole model from a checkpoint folder (``<out_dir>/checkpoints/step_N``)
    or its parent (then ``latest`` picks the folder): DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` over the ZeRO shards (stages 1-3; stage 0 reads the
    module state). Keys are those of ``model.state_dict()`` of the seqpar GPTModel at TP=1 (e.g.
    ``decoder.layers.0.self_attention.linear_qkv.weight``); the tensors are fp32 on the CPU. Runs
    without a process group. Verifies the manifest first (DeepSpeed's loader unpickles the files)."""
    path = pathlib.Path(path)
    if not (path / MANIFEST).is_file() and (path / "latest").is_file():
        path = latest(path)
    manifest = verify(path)
    if manifest["layout"]["tensor_parallel"] != 1:
        raise ValueError(f"{path} was written at tensor_parallel={manifest['layout']['tensor_parallel']}; "
                         f"consolidation of TP shards is not supported, resume it at TP=1 and save again")
    if manifest["zero_stage"] == 0:
        sd = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.float() for k, v in sd.items()}
