"""Checkpoints through megatron-core ``dist_checkpointing`` (``torch_dist`` backend), written atomically.

Layout of one checkpoint: ``<dir>/step_N/`` is a ``dist_checkpointing`` folder holding

- ``model``: ``model.sharded_state_dict()`` with per-layer keys — every TP-sharded parameter as a ShardedTensor of its
  global tensor, so a checkpoint loads at another tensor-parallel size (replicated parameters are
  written once, by their main replica);
- ``optimizer``: the megatron-core optimizer's own ``sharded_state_dict``: Adam's ``exp_avg`` /
  ``exp_avg_sq`` and the fp32 main weights, each a ShardedTensor of its parameter's global tensor
  (``optimizer.state.<name>.<param key>``). The distributed optimizer writes its DP x CP shards in
  megatron's ``fully_reshardable`` format (gathered into the parameter's shape), so a checkpoint
  loads at another DP, TP or PP size; param groups (Adam's step) are a common value;
- ``rng.*``: the RNG states as uint8 tensors (CPU generator, each TP RNG tracker state, CUDA
  generator), each a ShardedTensor ``[world, n]`` whose row r is global rank r's state (no pickle);
- common values (rank 0): ``step``, the parallel layout and the run's config;
- ``config.json``: the resolved recipe (compared with the resuming run's, ``compare_configs``);
- ``tokenizer/``: the run's tokenizer files (``seqpar.data.Tokenizer``: ``tokenizer.model``, or a Hugging
  Face tokenizer's ``tokenizer.json`` + config), compared with the resuming run's (``check_tokenizer``)
  and shipped by export;
- ``manifest.json``: size + SHA-256 of every other file (``seqpar.train.integrity``).

The LR schedule and the data position are functions of ``step`` (``OptimizerParamScheduler`` advanced
``step`` times, ``dataset.batch(step)``), so ``step`` restores them exactly. A checkpoint written with
the distributed optimizer loads only with it (and vice versa; the two store the fp32 main weights under
different keys), except a step-0 checkpoint (fresh optimizer), which loads into either.

Atomicity: every rank writes into ``<dir>/.tmp_step_N`` and hashes the files it wrote; after a
barrier rank 0 writes ``config.json`` and ``manifest.json`` there, renames it to ``step_N`` and
rewrites ``latest`` by tmp + rename, then deletes checkpoints beyond ``train.keep_last``. A crash
leaves the previous checkpoint intact and ``latest`` pointing at it.

Loading reads nothing through unrestricted pickle (``integrity.safe_load``); ``resumable`` verifies
the manifest first and falls back to the newest intact checkpoint or stops
(``train.on_corrupt_checkpoint``). A checkpoint of non-finite weights is never written.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import queue
import shutil
import sys
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

from seqpar.megatron.cpu_compat import cpu_checkpoint_request
from seqpar.train import integrity
from seqpar.train.integrity import CorruptCheckpointError, verify  # noqa: F401  verify: for readers (export)
from seqpar.train.outdir import STEP_DIR, checkpoints, held_run  # noqa: F401  held_run: part of this module's API

CONFIG_FILE = "config.json"  # the resolved recipe of the run that wrote the checkpoint
TOKENIZER_DIR = "tokenizer"  # the run's tokenizer files, inside each step folder (seqpar.data.Tokenizer.save)
LEGACY_TOKENIZER_FILE = "tokenizer.model"  # before #23: the sentencepiece model at the top of the step folder


def _layout() -> dict[str, int]:
    return {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "context_parallel": parallel_state.get_context_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _metadata() -> dict[str, Any]:
    # per-layer keys: hybrid patterns put different modules at each layer, which Megatron's stacked
    # (homogeneous) layout cannot describe; the distributed optimizer in the reshardable format
    # (gathered over DP with gloo on CPU, NCCL on GPU)
    return {"non_homogeneous_layers": True, "distrib_optim_sharding_type": "fully_reshardable",
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def _optimizer_kind(opt: Any) -> str:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(opt, "chained_optimizers", [opt])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in subs) else "replicated"


def _model_state(model: Sequence[torch.nn.Module]) -> dict[str, Any]:
    if len(model) != 1:
        raise ValueError("checkpoints of virtual pipeline stages (several model chunks) are not supported")
    chunk = getattr(model[0], "module", model[0])  # DDP wraps the megatron module
    return chunk.sharded_state_dict(metadata=_metadata())


@torch.no_grad()
def init_optimizer_state(opt: Any) -> None:
    """A fresh optimizer's state, as a step-0 checkpoint holds it: zero Adam moments, step 0 (e.g. for
    a run folder made from imported weights)."""
    _ensure_optimizer_state(opt)
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for state in sub.optimizer.state.values():
            state["step"] = torch.zeros((), dtype=torch.float32)
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k].zero_()


@torch.no_grad()
def _ensure_optimizer_state(opt: Any) -> None:
    """Give a fresh megatron optimizer its Adam state (zeros, step 1) so that its sharded state dict
    has the buffers ``dist_checkpointing.load`` fills in place. torch's AdamW creates its state in the
    first step (megatron's own dummy-step initialisation exists for its FSDP path only); the step
    runs with lr = weight decay = 0 and zero gradients, so no weight changes."""
    for sub in getattr(opt, "chained_optimizers", [opt]):
        inner = sub.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(inner.state.get(p) for p in params):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in params:
            p.grad = None
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def _unshare_adamw_steps(opt: Any) -> None:
    """One ``step`` tensor per parameter. megatron-core restores torch AdamW's step counter as a single
    tensor shared by every parameter's state, and AdamW increments each parameter's counter in
    place, so a shared one would advance by the number of parameters per step."""
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for state in sub.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _sharded_state(model: Sequence[torch.nn.Module], opt: Any, loading: bool) -> dict[str, Any]:
    """Model and optimizer as a sharded state dict; ``loading`` asks the optimizer for buffers to load into."""
    model_sd = _model_state(model)
    optim_sd = opt.sharded_state_dict(model_sd, is_loading=loading, metadata=_metadata())
    if optim_sd.get("param_state", {}) is None:
        # the memory-efficient reshardable format gathers the shards on DP rank 0 only; elsewhere there
        # is nothing to write (a None would be a common value that differs across ranks)
        del optim_sd["param_state"]
    return {"model": model_sd, "optimizer": optim_sd}


def _write_buckets(transforms: list, rank: int, buckets: list, results_queue: Any) -> None:
    """Replaces megatron-core 0.16's ``write_preloaded_data_multiproc``, which forks one writer per
    bucket (impossible in daemonic processes, e.g. multiprocessing test ranks) and needs psutil (not
    a megatron-core dependency). Writes the rank's buckets (at most ``thread_count`` = 2 files) one
    after the other in this process, same files and format, and reports the results the same way."""
    results: dict[int, list] | Exception = {}
    try:
        for i, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(buckets):
            with open(file_name, "wb") as stream:
                results[i] = [_write_item(*transforms, stream, data, item, storage_key,
                                          serialization_format=SerializationFormat.TORCH_SAVE)
                              for item, data in [*bytes_data, *tensor_data]]
                os.fsync(stream.fileno())
    except Exception as e:  # handed to megatron's finalize step, which raises it on the coordinator
        results = e
    results_queue.put(results)


def _flat_rng(rng: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"cpu": t, "tracker": {name: t}, "cuda": t | None}`` -> ``{"cpu": t, "tracker.<name>": t, ...}``."""
    flat = {"cpu": rng["cpu"]}
    flat.update({f"tracker.{k}": v for k, v in (rng.get("tracker") or {}).items()})
    if rng.get("cuda") is not None:
        flat["cuda"] = rng["cuda"]
    return flat


def _current_rng() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as tp_random

    return {"cpu": torch.get_rng_state(), "tracker": tp_random.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _rng_tensors(flat: dict[str, torch.Tensor], loading: bool) -> dict[str, ShardedTensor]:
    # row r of rng.<name> [world, n] is global rank r's state: CP/DP ranks of one TP rank may hold
    # different generator states; uint8 tensors, so no pickle is involved
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, t in flat.items():
        t = t.detach().to("cpu", torch.uint8).reshape(1, -1)
        buf = torch.zeros_like(t) if loading else t.clone()
        out[name] = ShardedTensor.from_rank_offsets(f"rng.{name}", buf, (0, rank, world), replica_id=0)
    return out


def _unflat_rng(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    flat = {k: v.reshape(-1).to(torch.uint8) for k, v in flat.items()}
    return {"cpu": flat["cpu"], "tracker": {k[len("tracker."):]: v for k, v in flat.items() if k.startswith("tracker.")},
            "cuda": flat.get("cuda")}


class NonFiniteCheckpointError(RuntimeError):
    """The weights to save hold NaN / inf: the save is refused (the previous checkpoint stays ``latest``)."""


def _check_finite(step: int, model: Sequence[torch.nn.Module]) -> None:
    """Collective: every rank learns whether any rank's weights are non-finite, and all raise."""
    params = [(n, p) for chunk in model for n, p in chunk.named_parameters()]
    bad = next((n for n, p in params if not torch.isfinite(p.detach()).all()), None)
    device = params[0][1].device if params else None  # collective inputs live on the parameters' device
    flag = torch.tensor([0.0 if bad is None else 1.0 + dist.get_rank()], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        who = f"rank {int(flag.item()) - 1}"
        raise NonFiniteCheckpointError(f"refusing to save step {step}: the weights are not finite ({who}"
                                       f"{f', first: {bad}' if bad else ''}); the newest checkpoint stays the "
                                       f"last finite one")


def _digests_of_own_files(tmp: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Hash the .distcp files this rank wrote (DCP names them ``__<rank>_<i>.distcp``) and gather
    every rank's digests."""
    return gathered_digests(tmp, [p.name for p in sorted(tmp.glob(f"__{dist.get_rank()}_*.distcp"))])


def gathered_digests(folder: pathlib.Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size + SHA-256 of this rank's ``names`` (files of ``folder``), merged with every other rank's
    (an object all-gather over the wire; nothing is unpickled from disk). Collective."""
    mine = {n: integrity.file_digest(folder / n) for n in names}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {k: v for d in every for k, v in d.items()}


def _prune(root: pathlib.Path, keep_last: int, keep: pathlib.Path) -> list[pathlib.Path]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``keep``, the one ``latest`` names)."""
    if keep_last <= 0:
        return []
    old = [p for p in checkpoints(root)[:-keep_last] if p != keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def write_sharded(sd: dict[str, Any], folder: pathlib.Path) -> None:
    """``dist_checkpointing.save(sd, folder)`` (torch_dist) written in this process (``_write_buckets``).
    Collective."""
    if filesystem_async._results_queue is None:
        # the writer's result queue is a process-wide lazy singleton (a multiprocessing Manager queue,
        # for forked writers); every save in this process goes through _write_buckets, in-process,
        # so a plain queue is enough and no Manager process is started
        filesystem_async._results_queue = queue.Queue()
    request = dist_checkpointing.save(sd, str(folder), sharded_strategy=("torch_dist", 1), async_sharded_save=True)
    if request.async_fn is not None:  # None: nothing to write on this rank
        request = request._replace(async_fn=partial(_write_buckets, request.async_fn.args[0]))
    if not torch.cuda.is_available():
        request = cpu_checkpoint_request(request)  # the staging step needs CUDA (cpu_compat docstring)
    request.execute_sync()  # write, barrier, then rank 0 writes the global metadata


def save(ckpt_dir: str | pathlib.Path, step: int, model: Sequence[torch.nn.Module], opt: Any, *, rng: Any,
         config: dict[str, Any], tokenizer: Any = None) -> pathlib.Path:
    """Write step ``step`` (model chunks, the megatron optimizer's state incl. fp32 main weights, RNG
    states, config) to
    ``<ckpt_dir>/step_N`` atomically, with ``config.json`` (``config``, the resolved recipe) and
    ``manifest.json``; then delete checkpoints beyond ``config["train"]["keep_last"]`` (0 / absent:
    keep all). ``tokenizer``: the run's ``seqpar.data.Tokenizer``, its files written to
    ``step_N/tokenizer/`` (resume compares them, export ships them). Raises NonFiniteCheckpointError (on every rank,
    nothing written) if the weights hold NaN / inf. Collective: every rank calls it."""
    _check_finite(step, model)
    root = pathlib.Path(ckpt_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded_state(model, opt, loading=False)
    sd.update(rng=_rng_tensors(_flat_rng(rng), loading=False), step=step, layout=_layout(), config=config,
              optimizer_kind=_optimizer_kind(opt))
    write_sharded(sd, tmp)
    if tokenizer is not None and dist.get_rank() == 0:
        tokenizer.save(tmp / TOKENIZER_DIR)
    dist.barrier()
    digests = _digests_of_own_files(tmp)
    if dist.get_rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
        integrity.write_manifest(tmp, digests, extra={"step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        _prune(root, int((config.get("train") or {}).get("keep_last") or 0), final)
    dist.barrier()
    return final


def latest(ckpt_dir: str | pathlib.Path) -> Optional[pathlib.Path]:
    """The folder ``latest`` points at, or None."""
    root = pathlib.Path(ckpt_dir)
    ptr = root / "latest"
    if not ptr.exists():
        return None
    return root / ptr.read_text().strip()


def load(path: pathlib.Path, model: Sequence[torch.nn.Module], opt: Any = None, *,
         config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load a checkpoint folder into the model chunks and the megatron optimizer (``opt`` None: the
    model only) at this run's parallel layout (TP, PP and DP x CP may differ from the ones it was
    written with). Returns ``step``,
    ``config``, ``layout``, ``changes`` and ``rng`` — this rank's RNG states, or None when the
    checkpoint was written with another parallel layout (per-rank generator states do not map
    across layouts).

    ``config`` (this run's resolved recipe): compared with the checkpoint's ``config.json`` before
    anything is loaded (``compare_configs``): a model change raises ConfigMismatchError listing the
    fields, other changes are printed on rank 0 and returned as ``changes``. Nothing is unpickled
    without restriction (``integrity.safe_load``)."""
    path = pathlib.Path(path)
    if not (path / "metadata.json").is_file():
        raise ValueError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json); "
                         f"pass a step_N folder written by seqpar.train")
    changes = check_resume(path, config) if config is not None else []
    common = integrity.load_common(path)
    kind = common.get("optimizer_kind")
    if opt is not None and (kind != _optimizer_kind(opt) or common["step"] == 0):
        if common["step"] != 0:
            raise ResumeError(f"{path} holds the state of a {kind} optimizer but this run builds a "
                              f"{_optimizer_kind(opt)} one; set optim.distributed to the value the checkpoint "
                              f"was written with ({'true' if kind == 'distributed' else 'false'})")
        # a step-0 checkpoint holds a fresh optimizer (zero moments, main weights = the model's, e.g. from
        # seqpar-import): either optimizer kind starts from its model weights alone
        opt_fresh, opt = opt, None
    else:
        opt_fresh = None
    if opt is None:
        sd = {"model": _model_state(model)}
    else:
        _ensure_optimizer_state(opt)
        sd = _sharded_state(model, opt, loading=True)
    same_layout = common["layout"] == _layout()
    if same_layout:
        sd["rng"] = _rng_tensors(_flat_rng(_current_rng()), loading=True)
    loaded = integrity.safe_load(sd, path)
    getattr(model[0], "module", model[0]).load_state_dict(loaded["model"])
    if opt is not None:
        opt.load_state_dict(loaded["optimizer"])
        _unshare_adamw_steps(opt)
    if opt_fresh is not None:
        opt_fresh.reload_model_params()
    return {"step": common["step"], "config": common["config"], "layout": common["layout"], "changes": changes,
            "rng": _unflat_rng(loaded["rng"]) if same_layout else None}


# ---------------------------------------------------------------------------------------------------
# resume: which checkpoint, with which recipe


class ResumeError(ValueError):
    """--resume / out_dir misuse: nothing to resume, a finished run, an existing run without --resume."""


class ConfigMismatchError(ResumeError):
    """Resuming with a recipe whose model differs from the checkpoint's."""


# fields whose change makes the saved weights mean something else (or not fit): an error on resume.
# Everything else (schedule, steps, parallel layout, outputs) may change and is printed.
_FIXED_SECTIONS = ("model",)
_FIXED_FIELDS = {("data", "vocab_size")}
_FREE_FIELDS = {("model", "moh_aux_loss_coef")}  # a loss weight, not part of the weights' meaning
# fields that define the training stream (the batch of step s): fixed once a step has been taken (a
# step-0 checkpoint, e.g. from seqpar-import, starts on any data)
_STREAM_FIELDS = {("data", f) for f in ("dataset", "blend", "split", "train_blend", "valid_blend", "test_blend",
                                        "files", "json_key")}


def checkpoint_tokenizer(path: str | pathlib.Path) -> Any:
    """The ``seqpar.data.Tokenizer`` stored in a step folder (``tokenizer/``, or a pre-#23
    ``tokenizer.model``), or None."""
    from seqpar.data.tokenizer import HF_FILES, SP_MODEL, Tokenizer

    path = pathlib.Path(path)
    folder = path / TOKENIZER_DIR
    if folder.is_dir():
        files = {n: (folder / n).read_bytes() for n in (SP_MODEL, *HF_FILES) if (folder / n).is_file()}
        return Tokenizer(files, str(folder)) if files else None
    if (path / LEGACY_TOKENIZER_FILE).is_file():
        return Tokenizer({SP_MODEL: (path / LEGACY_TOKENIZER_FILE).read_bytes()}, str(path / LEGACY_TOKENIZER_FILE))
    return None


def check_tokenizer(path: str | pathlib.Path, tokenizer: Any) -> None:
    """Before resuming from ``path``: the run's tokenizer (``seqpar.data.Tokenizer`` or None) must have the
    files the checkpoint was trained with, byte for byte (other files = other token ids for the same
    text). A step-0 checkpoint without a tokenizer (``seqpar-import`` of a folder that has none) starts
    with any. Raises ResumeError naming ``data.tokenizer`` and the fix."""
    saved = checkpoint_tokenizer(path)
    if saved is None and (tokenizer is None or int(integrity.read_manifest(path).get("step", 0)) == 0):
        return
    if saved is None:
        raise ResumeError(f"--resume: {path} holds no tokenizer (written without one, e.g. MQAR data or an import "
                          f"without a tokenizer) but this run uses {tokenizer.where}; token ids would change "
                          f"meaning: train on the checkpoint's data, or start a new run")
    if tokenizer is None:
        raise ResumeError(f"--resume: {path} was trained with the tokenizer in {saved.where} but this run has none "
                          f"(data.dataset=mqar); resume it on text data with data.tokenizer={saved.where}")
    if saved.fingerprint != tokenizer.fingerprint:
        raise ResumeError(f"--resume: data.tokenizer ({tokenizer.where}, sha256 {tokenizer.fingerprint[:12]}) is not "
                          f"the tokenizer {path} was trained with (sha256 {saved.fingerprint[:12]}): the same text "
                          f"would become other token ids; set data.tokenizer={saved.where} (the checkpoint's copy), "
                          f"or start a new run")


def _lr_jump(saved: dict[str, Any], new: dict[str, Any], step: int) -> str:
    """A line with the LR at the resume step under both recipes, when it differs."""
    try:
        from seqpar.train.config import from_dict
        from seqpar.train.runtime import build_scheduler

        def lr_at(cfg: Any) -> float:  # the LR of 0-based optimizer step `step` (scheduler at step + 1)
            sched = build_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0))
            sched.num_steps = step + 1
            return sched.get_lr(sched.optimizer.param_groups[0])

        a, b = lr_at(from_dict(saved)), lr_at(from_dict(new))
    except Exception:  # noqa: BLE001 - an older recipe the schema no longer reads: the field list says enough
        return ""
    return f"\n  -> the learning rate at step {step} changes from {a:.3g} to {b:.3g}" if a != b else ""


def check_resume(path: str | pathlib.Path, config: dict[str, Any]) -> list[str]:
    """Before loading checkpoint ``path`` (either engine) into a run with the resolved recipe ``config``:
    ``compare_configs`` with the saved ``config.json`` (ConfigMismatchError for a model change; other
    changes printed on rank 0 with the LR jump, and returned) and refuse a finished run (ResumeError:
    the manifest's step is already ``train.steps``)."""
    path = pathlib.Path(path)
    saved = saved_config(path)
    step = int(integrity.read_manifest(path).get("step", 0))
    changes = compare_configs(saved, config, where=str(path), step=step)
    if changes and _rank_world()[0] == 0:
        print(f"[seqpar.train] resuming {path} with a changed recipe (allowed; the LR schedule and data "
              f"position follow the new values from step {step} on):\n"
              + "\n".join(f"  {c}" for c in changes) + _lr_jump(saved, config, step), file=sys.stderr, flush=True)
    if step >= config["train"]["steps"]:
        raise ResumeError(f"--resume: {path} is step {step}, already the end of the run "
                          f"(train.steps={config['train']['steps']}); nothing to train. To train longer, raise "
                          f"train.steps (e.g. --set train.steps={2 * step}): the LR schedule is then "
                          f"recomputed for the new length")
    return changes


def saved_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The resolved recipe saved in a checkpoint folder (``config.json``)."""
    f = pathlib.Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CorruptCheckpointError(pathlib.Path(path), CONFIG_FILE, "missing (cannot check the recipe on resume)")
    return json.loads(f.read_text())


def _leaves(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict) and not (prefix and prefix[-1] == "cp_schemes"):
        out: dict[tuple, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, prefix + (k,)))
        return out
    return {prefix: tree}


def compare_configs(saved: dict[str, Any], new: dict[str, Any], where: str = "the checkpoint",
                    step: int = 1) -> list[str]:
    """Differences between the recipe a checkpoint was written with and the resuming one.

    Raises ConfigMismatchError listing every changed model field (``model.*`` except
    ``moh_aux_loss_coef``, and ``data.vocab_size``): the weights would be loaded into layers of
    another kind or shape; and, for a checkpoint past step 0, every changed field of the data stream
    (``data.dataset`` / ``blend`` / ``split`` / per-split blends / ``files`` / ``json_key``): the
    batches from the resume step on would not be the uninterrupted run's. Returns ``["optim.lr: 0.0003 -> 0.003", ...]`` for the other changes
    (allowed). Fields unknown to one side (a newer / older seqpar) count as changes."""
    a, b = _leaves(saved), _leaves(new)
    fixed, stream, free = [], [], []
    for key in sorted(set(a) | set(b), key=lambda k: ".".join(map(str, k))):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb:
            continue
        line = f"{'.'.join(map(str, key))}: {json.dumps(va)} -> {json.dumps(vb)}"
        is_fixed = (key[0] in _FIXED_SECTIONS or key[:2] in _FIXED_FIELDS) and key[:2] not in _FREE_FIELDS
        # a field one side lacks (a recipe of an older seqpar) is not a change of the stream
        in_stream = key[:2] in _STREAM_FIELDS and step and "<absent>" not in (va, vb)
        (fixed if is_fixed else stream if in_stream else free).append(line)
    if fixed:
        raise ConfigMismatchError(f"--resume: the recipe's model differs from the one {where} was written with:\n"
                                  + "\n".join(f"  {x}" for x in fixed)
                                  + "\nuse the checkpoint's values, or start a new run (another train.out_dir)")
    if stream:
        raise ConfigMismatchError(f"--resume: the recipe's data stream differs from the one {where} was trained on "
                                  f"(step {step}; the batch of a step is a function of the data fields and the seed):\n"
                                  + "\n".join(f"  {x}" for x in stream)
                                  + "\nuse the checkpoint's values, or start a new run (another train.out_dir)")
    return free


def resumable(ckpt_dir: str | pathlib.Path, on_corrupt: str = "stop") -> pathlib.Path:
    """The checkpoint ``--resume`` loads: the one ``latest`` names, verified against its manifest.

    If it is corrupt (a changed, truncated or missing file): ``on_corrupt="stop"`` raises
    CorruptCheckpointError naming the file; ``"fallback"`` warns naming the corrupt checkpoint, the
    file and the fallback, and returns the newest intact older checkpoint (or raises if none is).
    Collective: the files are hashed in parallel (file i by rank i mod world) and every rank gets
    the same answer."""
    root = pathlib.Path(ckpt_dir)
    head = latest(root)
    if head is None:
        raise ResumeError(f"--resume: no checkpoint under {root} (no 'latest' file); run without --resume first")
    older = [p for p in checkpoints(root) if _step_of(p) < _step_of(head)][::-1]
    problems = []
    for cand in [head, *older]:
        err = _verify_collective(cand)
        if err is None:
            if problems and _rank_world()[0] == 0:
                print(f"[seqpar.train] WARNING: {problems[0]}; falling back to {cand}, the newest intact checkpoint"
                      + (f" (also corrupt: {', '.join(str(p.folder.name) for p in problems[1:])})"
                         if len(problems) > 1 else ""), file=sys.stderr, flush=True)
            return cand
        problems.append(err)
        if on_corrupt == "stop":
            raise CorruptCheckpointError(err.folder, err.file, err.reason + " (train.on_corrupt_checkpoint=stop; "
                                         "set it to 'fallback' to resume from the newest intact checkpoint)")
    raise CorruptCheckpointError(problems[0].folder, problems[0].file,
                                 problems[0].reason + f"; no intact checkpoint to fall back to under {root}")


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _step_of(path: pathlib.Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def _verify_collective(folder: pathlib.Path) -> Optional[CorruptCheckpointError]:
    rank, world = _rank_world()
    err: Optional[CorruptCheckpointError] = None
    try:
        files = integrity.manifest_files(folder)
        integrity.verify(folder, only=files[rank::world])
        if rank == 0:  # extra files: once
            extra = sorted(set(integrity._files(folder)) - set(files))
            if extra:
                raise CorruptCheckpointError(folder, extra[0], "not in the manifest (added after the save)")
    except CorruptCheckpointError as e:
        err = e
    if world == 1:
        return err
    every: list[Any] = [None] * world
    dist.all_gather_object(every, None if err is None else (str(err.folder), err.file, err.reason))
    first = next((e for e in every if e is not None), None)
    return None if first is None else CorruptCheckpointError(pathlib.Path(first[0]), first[1], first[2])


def prepare_out_dir(out_dir: str | pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Before a run: without ``--resume``, an out_dir holding checkpoints is refused (ResumeError
    naming what is there) unless ``overwrite`` (train.overwrite), which deletes them and the
    tensorboard events; events of a run that never wrote a checkpoint are removed (printed).
    Collective (rank 0 looks and deletes, every rank gets the answer)."""
    out = pathlib.Path(out_dir)
    msg = None
    if _rank_world()[0] == 0 and not resume:
        found = [str(p) for p in checkpoints(out / "checkpoints")]
        events = [str(p) for p in (out / "tb").glob("events.out.tfevents.*")] if (out / "tb").is_dir() else []
        if events and not found and not overwrite:
            # a run that died before its first checkpoint (e.g. a torchrun restart): nothing to resume,
            # and its curve would mix with this one's
            shutil.rmtree(out / "tb", ignore_errors=True)
            print(f"[seqpar.train] {out / 'tb'}: removed the events of a run that never wrote a checkpoint",
                  file=sys.stderr, flush=True)
            events = []
        found += events
        if found and overwrite:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "tb", ignore_errors=True)
            print(f"[seqpar.train] train.overwrite: deleted {len(found)} checkpoint / tensorboard file(s) of the "
                  f"previous run in {out}", file=sys.stderr, flush=True)
        elif found:
            msg = held_run(out)
    box = [msg]
    if _rank_world()[1] > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise ResumeError(box[0])
