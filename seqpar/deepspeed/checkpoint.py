"""Checkpoints of the DeepSpeed engine: ``engine.save_checkpoint`` / ``engine.load_checkpoint``
(DeepSpeed's own format, ZeRO shards included), written atomically and verified like
``seqpar.train.checkpoint``'s, and loaded without running code from disk.

Layout of ``<out_dir>/checkpoints``::

    latest                      text: the tag of the newest complete checkpoint ("step_0000008"),
                                the same file DeepSpeed's own tools (zero_to_fp32) read
    step_0000008/               one DeepSpeed checkpoint folder (tag = folder name)
      mp_rank_00_model_states.pt            module state (+ DeepSpeed's client state)
      *zero_pp_rank_<r>_mp_rank_00_optim_states.pt   ZeRO shards (one per DP x CP rank; stage 0: none,
                                            the optimizer state is in the model-states file)
      rng/rank_<global rank>.pt             per-rank RNG states (plain tensors)
      config.json                           the resolved recipe (seqpar.train.checkpoint.CONFIG_FILE)
      tokenizer/                            the run's tokenizer files (seqpar.data.Tokenizer; TOKENIZER_DIR)
      manifest.json                         seqpar.train.integrity's manifest: size + SHA-256 of every
                                            file above, plus engine="deepspeed", step, layout, zero_stage
    zero_to_fp32.py             DeepSpeed's consolidation script (written by DeepSpeed)

Atomicity: every rank saves into ``.tmp_step_N`` (a DeepSpeed tag of its own, ``save_latest=False``);
after a barrier the ranks hash the files (file i by rank i mod world), rank 0 writes the manifest,
renames the folder to ``step_N`` and rewrites ``latest`` by tmp + rename. A crash leaves the
previous checkpoint and ``latest`` intact.

Loading executes nothing from disk. DeepSpeed's loaders unpickle with ``torch.load(weights_only=False)``;
here, after the manifest check: (1) every pickle of the folder is disassembled (not run) and refused if it
names a global outside torch's weights-only set and :func:`deepspeed_globals` (the three classes DeepSpeed
writes) — ``UnsafeCheckpointError("refusing to unpickle builtins.exec from ...")`` on every rank before
DeepSpeed reads anything; (2) the engine's checkpoint engine is replaced by a weights-only one (DeepSpeed's
``CheckpointEngine`` interface; :func:`_weights_only_checkpoint_engine`), and (3) every DeepSpeed call that
reads checkpoint files runs inside ``integrity.forced_weights_only`` (:func:`_deepspeed_reads`, the one place
that names those calls), so even a load that bypasses the checkpoint engine is weights-only.

Exact resume: DeepSpeed restores the module, the ZeRO-partitioned fp32 master weights and AdamW
moments and the LR scheduler; ``step`` restores the data position; the RNG files the generators.
A checkpoint written at another DP x CP size (ZeRO partitions differ) is converted once with
DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) into
``step_N.universal/`` and loaded with ``checkpoint.load_universal`` (parameters and optimizer moments
are re-partitioned exactly; RNG states, which are per rank, are not restored).

For the HF exporter, :func:`consolidated_fp32_state_dict` gives one fp32 state dict of the whole
TP=1 model, keyed like ``model.state_dict()``: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
per TP rank (it assumes one model-parallel rank per folder, so it reads a view holding only that rank's
``*mp_rank_<t>_*`` files), then the TP shards merged as megatron-core split them. How each parameter is
split is read from the live model at save time (:func:`tp_split`: megatron's ``partition_dim`` attribute,
the sections of fused projections) into the manifest's ``tp_split`` field, so the merge never guesses
from names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from seqpar.train import integrity
from seqpar.train.checkpoint import (CONFIG_FILE, TOKENIZER_DIR, _layout, _prune, _verify_collective,
                                     _write_atomic, check_resume, gathered_digests, latest)  # latest: checkpoint.latest(ckpt_dir)

ENGINE = "deepspeed"  # the manifest's "engine" field of these folders
TP_SPLIT = "tp_split"  # the manifest's field: tp_split(model) of the saved model


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves the local data empty; ds_shape is the TP shard's


def tp_split(model: torch.nn.Module) -> dict[str, list]:
    """How megatron-core split each parameter of ``model`` (this rank's TP shard of the seqpar
    GPTModel) over tensor parallelism, read from the model: ``name -> [partition_dim, sections]``.

    ``partition_dim`` is the dimension megatron's parallel layers cut (their ``tensor_model_parallel`` /
    ``partition_dim`` attributes: 0 for column-parallel weights and biases, the vocab-parallel
    embedding, the output layer and Lightning's per-head ``norm_weight``; 1 for row-parallel weights),
    or None for a replicated parameter (norms, row-parallel biases), identical on every TP rank.
    ``sections`` are this rank's row counts of a fused projection whose sections are split one by one
    (a rank holds ``[s_0 / tp; s_1 / tp; ...]`` of the TP=1 rows ``[s_0; s_1; ...]``): SwiGLU's
    ``linear_fc1`` ``[gate; up]`` (megatron's ``apply_swiglu_sharded_factory``) and Lightning's
    ``linear_qkvg`` ``[q; k; v; gate]`` (``LightningSelfAttention._sections``: k and v sized by the kv
    heads); ``[]`` for a plain split. JSON-serialisable (the manifest's ``tp_split``)::

        column-parallel, TP=2      fused [a; b], TP=2          row-parallel, TP=2
        rank0 = W[:n/2, :]         rank0 = [a[:na/2]; b[:nb/2]]   rank0 = W[:, :m/2]
        rank1 = W[n/2:, :]         rank1 = [a[na/2:]; b[nb/2:]]   rank1 = W[:, m/2:]
    """
    from megatron.core.transformer.mlp import MLP

    from seqpar.megatron.attention import LightningSelfAttention

    fused: dict[str, list[int]] = {}
    for mname, mod in model.named_modules():
        pre = f"{mname}." if mname else ""
        if isinstance(mod, LightningSelfAttention):
            for n, _ in mod.linear_qkvg.named_parameters():
                fused[f"{pre}linear_qkvg.{n}"] = [int(x) for x in mod._sections()]
        elif isinstance(mod, MLP) and mod.config.gated_linear_unit:
            for n, p in mod.linear_fc1.named_parameters():
                rows = _shape(p)[0]
                fused[f"{pre}linear_fc1.{n}"] = [rows // 2, rows // 2]
    return {name: ([int(p.partition_dim), fused.get(name, [])] if getattr(p, "tensor_model_parallel", False)
                   else [None, []]) for name, p in model.named_parameters()}


def deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed (0.19) pickles into its checkpoint files besides tensors, containers and
    numbers — the allow-list of every load here: the ZeRO optimizer state's loss scaler
    (``LossScaler``; fp32 and bf16 runs), its ``zero_stage`` (``ZeroStageEnum``) and ZeRO-1/2's
    ``param_slice_mappings`` entries (``fragment_address``). Reconstructing them calls no code of the
    file's choosing (plain attribute state; an int enum)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _deepspeed_reads(path: pathlib.Path) -> Iterator[None]:
    """Around every DeepSpeed call that reads checkpoint files. They call ``torch.load(...,
    weights_only=False)`` themselves: ``DeepSpeedEngine.load_checkpoint`` (through its checkpoint
    engine, replaced here, and directly in the universal path: ``universal_checkpoint.load_hp_checkpoint_state``,
    ``base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir``, ``stage3.load_hp_checkpoint_state``),
    ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (``parse_model_states`` / ``parse_optim_states``)
    and ``ds_to_universal`` (a subprocess, :func:`_universal`). Inside, torch forces them weights-only
    with :func:`deepspeed_globals` allowed."""
    with integrity.forced_weights_only(deepspeed_globals(), source=f"DeepSpeed checkpoint {path}"):
        yield


@functools.lru_cache(maxsize=None)
def _weights_only_checkpoint_engine() -> type:
    """DeepSpeed's ``TorchCheckpointEngine`` (torch.save; same files) whose ``load`` is
    ``integrity.weights_only_load`` with :func:`deepspeed_globals`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return integrity.weights_only_load(path, str(path), allow=deepspeed_globals(), map_location=map_location)

    return WeightsOnlyCheckpointEngine


def _use_weights_only_loads(engine: Any) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    # the default engine only: one a ds_config "checkpoint.writer" selects is kept (its loads are still
    # forced weights-only by _deepspeed_reads)
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = _weights_only_checkpoint_engine()(engine._config)


def _pickles(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*.pt") if p.is_file())


def check_pickles(folder: pathlib.Path, *, collective: bool = False) -> None:
    """Refuse the folder if any of its ``.pt`` files names a global outside the allow-list
    (disassembled, not run): UnsafeCheckpointError naming the file and the global (CorruptCheckpointError
    for a file that is no torch.save zip). ``collective``: file i is checked by rank i mod world and
    every rank raises the same error (the first by rank)."""
    files = _pickles(folder)
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    err: Optional[tuple] = None
    try:
        for f in files[rank::world]:
            integrity.check_pickle_globals(f, allow=deepspeed_globals(), source=str(f))
    except integrity.CorruptCheckpointError as e:
        err = ("corrupt", str(e.folder), e.file, e.reason)
    except integrity.UnsafeCheckpointError as e:
        err = ("unsafe", str(e))
    if world > 1:
        every: list[Any] = [None] * world
        dist.all_gather_object(every, err)
        err = next((e for e in every if e is not None), None)
    if err is not None:
        raise (integrity.CorruptCheckpointError(pathlib.Path(err[1]), err[2], err[3]) if err[0] == "corrupt"
               else integrity.UnsafeCheckpointError(err[1]))


def save(engine: Any, ckpt_dir: str | pathlib.Path, step: int, *, rng: Any, config: dict[str, Any],
         keep_last: int = 0, tokenizer: Any = None) -> pathlib.Path:
    """Write step ``step`` through ``engine.save_checkpoint`` into ``<ckpt_dir>/step_N`` atomically, with
    ``config.json`` (``config``, the resolved recipe), ``tokenizer/`` (``tokenizer``: the run's
    ``seqpar.data.Tokenizer``, if any) and ``manifest.json``; then delete all but the newest
    ``keep_last`` checkpoints (0 = keep all; train.keep_last) with their converted ``.universal`` copies.
    Collective: every rank calls it."""
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
    # patterns: TP shards are not re-split by this path). step, layout and the recipe live in the
    # manifest and config.json.
    client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, client_state=client)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng, tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
    dist.barrier()
    # every file of the folder, file i hashed by rank i mod world
    digests = gathered_digests(tmp, integrity._files(tmp)[rank::dist.get_world_size()])
    if rank == 0:
        integrity.write_manifest(tmp, digests, extra={"engine": ENGINE, "step": step, "layout": layout,
                                                      "zero_stage": engine.zero_optimization_stage(),
                                                      TP_SPLIT: tp_split(engine.module)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        for old in _prune(root, keep_last, final):
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)
    dist.barrier()
    return final


def _is_ours(path: pathlib.Path, manifest: dict[str, Any]) -> dict[str, Any]:
    if manifest.get("engine") != ENGINE:
        raise ValueError(f"{path} is not a DeepSpeed checkpoint of seqpar (its manifest.json has engine="
                         f"{manifest.get('engine', 'megatron')!r}); pass a step_N folder written with "
                         f"train.engine=deepspeed")
    return manifest


def verify(path: str | pathlib.Path) -> dict[str, Any]:
    """Check a ``step_N`` folder against its manifest (every file present, sizes and SHA-256 equal, no
    file added) and that it is a DeepSpeed checkpoint; returns the manifest. Raises
    ``integrity.CorruptCheckpointError`` (a ValueError) naming the first bad file."""
    path = pathlib.Path(path)
    _not_legacy(path)
    return _is_ours(path, integrity.verify(path))


def _not_legacy(path: pathlib.Path) -> None:
    if (path / "seqpar_manifest.json").is_file() and not (path / integrity.MANIFEST).is_file():
        raise ValueError(f"{path} was written by an older seqpar (seqpar_manifest.json, format "
                         f"seqpar-deepspeed/1), which this version no longer reads")


# ds_to_universal in a child process with DeepSpeed's classes allowed for torch's weights-only loads
# (the child runs with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, see _universal); its worker pools fork from it
_TO_UNIVERSAL = ("import runpy, torch; from seqpar.deepspeed.checkpoint import deepspeed_globals; "
                 "torch.serialization.add_safe_globals(deepspeed_globals()); "
                 "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)")


def _universal(path: pathlib.Path) -> pathlib.Path:
    """DeepSpeed's universal checkpoint of ``path`` (converted once, by rank 0, atomically; every load
    weights-only). Collective: a failure on rank 0 is raised on every rank."""
    out = path.with_name(path.name + ".universal")
    err: list[Optional[tuple[str, str]]] = [None]
    if dist.get_rank() == 0 and not (out / "zero").is_dir():
        try:
            _convert(path, out)
        except Exception as e:  # noqa: BLE001 - handed to every rank below
            err[0] = (type(e).__name__, str(e))
    dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        kind, msg = err[0]
        raise (integrity.UnsafeCheckpointError if kind == "UnsafeCheckpointError" else RuntimeError)(msg)
    return out


def _convert(path: pathlib.Path, out: pathlib.Path) -> None:
    tmp = path.with_name(f".tmp_{path.name}.universal")
    src = path.with_name(f".tmp_{path.name}.source")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(path, src)
    try:
        # megatron-core modules put `_extra_state` entries (None, not tensors) in state_dict(); the
        # converter saves every module entry as a tensor, so the copy it reads has only tensors
        for f in src.glob("mp_rank_*_model_states.pt"):
            state = integrity.weights_only_load(f, str(path / f.name), allow=deepspeed_globals(), map_location="cpu")
            state["module"] = {k: v for k, v in state["module"].items() if torch.is_tensor(v)}
            torch.save(state, f)
        # a subprocess: the converter forks worker pools, which a daemonic rank process may not
        cmd = [sys.executable, "-c", _TO_UNIVERSAL, "--input_folder", str(src), "--output_folder", str(tmp),
               "--num_extract_workers", "1", "--num_merge_workers", "1", "--no_strict"]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
               "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}  # ds_to_universal's torch.load(weights_only=False) calls
        env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if "Weights only load failed" in res.stderr:  # torch's refusal inside the converter
            raise integrity.refused_unpickling(Exception(res.stderr), f"a file of DeepSpeed checkpoint {path} "
                                                            f"(DeepSpeed's ds_to_universal)")
        raise RuntimeError(f"ds_to_universal failed on {path}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load(engine: Any, path: str | pathlib.Path, *, config: Optional[dict[str, Any]] = None,
         verified: bool = False) -> dict[str, Any]:
    """Load a ``step_N`` folder into ``engine`` (module, ZeRO optimizer state, LR scheduler). Returns
    ``step``, ``config`` (the saved recipe), ``layout``, ``changes`` and ``rng`` (this rank's RNG states,
    or None when the checkpoint was written with another parallel layout). Collective.

    ``config`` (this run's resolved recipe): checked against the saved one first, as for the Megatron
    engine (``seqpar.train.checkpoint.check_resume``: a model change or a finished run is refused, other
    changes printed and returned as ``changes``).

    Before DeepSpeed reads anything, on every rank: the manifest (files hashed in parallel, every rank
    gets the same answer; CorruptCheckpointError naming the file; skipped with ``verified=True``, when the
    caller has just checked it: ``seqpar.train.checkpoint.resumable``) and the pickle check
    (UnsafeCheckpointError naming the file and the refused global); DeepSpeed's reads then run
    weights-only (module docstring)."""
    path = pathlib.Path(path)
    _not_legacy(path)
    err = None if verified else _verify_collective(path)
    if err is not None:
        raise err
    manifest = _is_ours(path, integrity.read_manifest(path))
    changes = check_resume(path, config) if config is not None else []
    check_pickles(path, collective=True)
    same = manifest["layout"] == _layout()
    if manifest["zero_stage"] != engine.zero_optimization_stage():
        raise ValueError(f"checkpoint {path} was written with ZeRO stage {manifest['zero_stage']}; this run has "
                         f"deepspeed.zero_stage={engine.zero_optimization_stage()}; resume with the same stage")
    _use_weights_only_loads(engine)
    with _deepspeed_reads(path):
        if same:
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
        else:
            uni = _universal(path)
            engine._config.load_universal_checkpoint = True  # DeepSpeed's checkpoint.load_universal switch
            try:
                # not strict: the converted module state has no `_extra_state` entries (see _universal);
                # every parameter is then set from the universal fp32 files
                loaded, _ = engine.load_checkpoint(str(uni.parent), tag=uni.name, load_module_strict=False)
            finally:
                engine._config.load_universal_checkpoint = False
    if loaded is None:
        raise ValueError(f"DeepSpeed could not load {path}")
    rng = None
    if same:
        f = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
        rng = integrity.weights_only_load(f, str(f))
    saved = json.loads((path / CONFIG_FILE).read_text())
    return {"step": manifest["step"], "config": saved, "layout": manifest["layout"], "changes": changes, "rng": rng}


def consolidated_fp32_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the whole model from a checkpoint folder (``<out_dir>/checkpoints/step_N``)
    or its parent (then ``latest`` picks the folder), saved at any TP x CP x DP layout. Keys are those
    of ``model.state_dict()`` of the seqpar GPTModel at TP=1 (e.g.
    ``decoder.layers.0.self_attention.linear_qkv.weight``); tensors are fp32 on the CPU, with TP=1
    shapes. Runs without a process group.

    Per TP rank t: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` over that rank's ZeRO shards
    (stages 1-3; stage 0 reads its ``mp_rank_<t>_model_states.pt`` module state); DeepSpeed's function
    globs every ``*_model_states.pt`` / ``*_optim_states.pt`` of a folder as one model-parallel rank, so
    it reads a temporary folder of links to rank t's files only. The TP-local tensors are then merged
    with the manifest's ``tp_split`` (:func:`tp_split`, :func:`_merge_tp`). Verifies the manifest and the
    pickles first; every read is weights-only (module docstring).

    Raises ``integrity.CorruptCheckpointError`` / ``UnsafeCheckpointError`` (a damaged or crafted
    file), ValueError (a TP > 1 checkpoint without ``tp_split``: written by an older seqpar; TP ranks
    whose replicated parameters differ; a parameter the split does not cover)."""
    path = pathlib.Path(path)
    if not (path / integrity.MANIFEST).is_file() and (path / "latest").is_file():
        path = latest(path)
    manifest = verify(path)
    tp = int(manifest["layout"]["tensor_parallel"])
    if tp > 1 and TP_SPLIT not in manifest:
        raise ValueError(f"{path} was written at tensor_parallel={tp} by an older seqpar whose manifest has no "
                         f"{TP_SPLIT!r} (how each parameter is split over TP); resume it with this version "
                         f"(train --resume) and save again, or train with parallel.tensor_parallel=1")
    check_pickles(path)
    parts = [_consolidate_tp_rank(path, t, manifest["zero_stage"]) for t in range(tp)]
    return parts[0] if tp == 1 else _merge_tp(parts, manifest[TP_SPLIT], path)


def _consolidate_tp_rank(path: pathlib.Path, t: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 state dict of TP rank ``t``'s shard (TP-local shapes)."""
    if zero_stage == 0:
        f = path / f"mp_rank_{t:02d}_model_states.pt"
        sd = integrity.weights_only_load(f, str(f), allow=deepspeed_globals(), map_location="cpu")["module"]
        return {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's names: mp_rank_<t>_model_states.pt (stages 1-2), zero_pp_rank_<r>_mp_rank_<t>_model_states.pt
    # (stage 3), zero_pp_rank_<r>_mp_rank_<t>_optim_states.pt
    mine = [f for f in sorted(path.iterdir()) if f.name.endswith(("_model_states.pt", "_optim_states.pt"))
            and (f.name.startswith(f"mp_rank_{t:02d}_") or f"_mp_rank_{t:02d}_" in f.name)]
    with tempfile.TemporaryDirectory(prefix=".seqpar_tp_view_") as tmp:
        view = pathlib.Path(tmp) / path.name
        view.mkdir()
        for f in mine:
            (view / f.name).symlink_to(f.resolve())
        with _deepspeed_reads(path):
            sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name)
    return {k: v.float() for k, v in sd.items()}


def _merge_tp(parts: list[dict[str, torch.Tensor]], split: dict[str, list], path: pathlib.Path
              ) -> dict[str, torch.Tensor]:
    """TP=1 tensors from the TP ranks' ``parts`` (rank order) by ``split`` (:func:`tp_split`): shards
    concatenated along ``partition_dim`` (fused projections section by section), replicated
    parameters taken from rank 0 after checking that every rank holds the same values."""
    names = list(parts[0])
    for t, p in enumerate(parts[1:], 1):
        if set(p) != set(names):
            raise ValueError(f"{path}: TP rank {t} holds other parameters than rank 0 "
                             f"({sorted(set(p) ^ set(names))[:5]}); the checkpoint is inconsistent")
    missing = [n for n in names if n not in split]
    if missing:
        raise ValueError(f"{path}: no TP split recorded for {missing[:5]} (manifest {TP_SPLIT!r}); "
                         f"refusing to guess how to merge them")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        dim, secs = split[name]
        ts = [p[name] for p in parts]
        if dim is None:
            bad = [t for t in range(1, len(ts)) if not torch.equal(ts[t], ts[0])]
            if bad:
                raise ValueError(f"{path}: {name} is replicated over TP but rank {bad[0]} holds other values "
                                 f"than rank 0 (max abs diff {(ts[bad[0]] - ts[0]).abs().max().item():.3g})")
            out[name] = ts[0]
        elif secs:
            if sum(secs) != ts[0].shape[dim]:
                raise ValueError(f"{path}: {name} has {ts[0].shape[dim]} rows per TP rank, its recorded "
                                 f"sections {secs} sum to {sum(secs)}")
            pieces = [torch.split(x, secs, dim=dim) for x in ts]
            out[name] = torch.cat([torch.cat([pc[i] for pc in pieces], dim=dim) for i in range(len(secs))], dim=dim)
        else:
            out[name] = torch.cat(ts, dim=dim)
    return out
