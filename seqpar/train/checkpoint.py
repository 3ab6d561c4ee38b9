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
- ``rng``: one ShardedObject per global rank (CPU generator, the TP RNG tracker, CUDA generator);
- common values (rank 0): ``step``, the parallel layout and the run's config.

The LR schedule and the data position are functions of ``step`` (``OptimizerParamScheduler`` advanced
``step`` times, ``dataset.batch(step)``), so ``step`` restores them exactly. A checkpoint written with
the distributed optimizer loads only with it (and vice versa): the two store the fp32 main weights
under different keys (``optimizer.state.param`` / ``optimizer.state.fp32_param``).

Atomicity: every rank writes into ``<dir>/.tmp_step_N``; after a barrier rank 0 renames it to
``step_N`` and rewrites ``latest`` by tmp + rename. A crash leaves the previous checkpoint intact and
``latest`` pointing at it.
"""

from __future__ import annotations

import os
import pathlib
import queue
import shutil
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

from seqpar.megatron.cpu_compat import cpu_checkpoint_request

TOKENIZER_FILE = "tokenizer.model"  # the run's sentencepiece model, inside each step folder


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


def _rng_object(rng: Any) -> ShardedObject:
    # one object per global rank: CP/DP ranks of one TP rank may hold different generator states
    return ShardedObject("rng_state", rng, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def save(ckpt_dir: str | pathlib.Path, step: int, model: Sequence[torch.nn.Module], opt: Any, *, rng: Any,
         config: dict[str, Any], tokenizer_model: Optional[bytes] = None) -> pathlib.Path:
    """Write step ``step`` (model chunks, the megatron optimizer's state incl. fp32 main weights, RNG
    states, config) to ``<ckpt_dir>/step_N`` atomically. Collective: every rank calls it.
    ``tokenizer_model``: the run's serialized sentencepiece model, written as ``step_N/tokenizer.model``
    (export reads it)."""
    root = pathlib.Path(ckpt_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded_state(model, opt, loading=False)
    sd.update(rng=_rng_object(rng), step=step, layout=_layout(), config=config, optimizer_kind=_optimizer_kind(opt))
    if filesystem_async._results_queue is None:
        # the writer's result queue is a process-wide lazy singleton (a multiprocessing Manager queue,
        # for forked writers); every save in this process goes through _write_buckets, in-process,
        # so a plain queue is enough and no Manager process is started
        filesystem_async._results_queue = queue.Queue()
    request = dist_checkpointing.save(sd, str(tmp), sharded_strategy=("torch_dist", 1), async_sharded_save=True)
    if request.async_fn is not None:  # None: nothing to write on this rank
        request = request._replace(async_fn=partial(_write_buckets, request.async_fn.args[0]))
    if not torch.cuda.is_available():
        request = cpu_checkpoint_request(request)  # the staging step needs CUDA (cpu_compat docstring)
    request.execute_sync()  # write, barrier, then rank 0 writes the global metadata
    if tokenizer_model is not None and dist.get_rank() == 0:
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_model)
    dist.barrier()
    if dist.get_rank() == 0:
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


def load(path: pathlib.Path, model: Sequence[torch.nn.Module], opt: Any = None) -> dict[str, Any]:
    """Load a checkpoint folder into the model chunks and the megatron optimizer (``opt`` None: the
    model only) at this run's parallel layout (TP, PP and DP x CP may differ from the ones it was
    written with). Returns ``step``,
    ``config``, ``layout`` and ``rng`` — this rank's RNG states, or None when the checkpoint was
    written with another parallel layout (per-rank generator states do not map across layouts)."""
    if not (path / "metadata.json").is_file():
        raise ValueError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json); "
                         f"pass a step_N folder written by seqpar.train")
    common = dist_checkpointing.load_common_state_dict(str(path))
    kind = common.get("optimizer_kind")
    fresh = opt is not None and kind != _optimizer_kind(opt) and common["step"] == 0
    if fresh:
        # a step-0 checkpoint holds a fresh optimizer (zero moments, main weights = the model's, e.g. from
        # seqpar-import): either optimizer kind starts from its model weights alone
        loaded = load(path, model, None)
        opt.reload_model_params()
        return loaded
    if opt is not None and kind != _optimizer_kind(opt):
        raise ValueError(f"{path} holds the state of a {kind} optimizer but this run builds a "
                         f"{_optimizer_kind(opt)} one; set optim.distributed to the value the checkpoint was "
                         f"written with ({'true' if kind == 'distributed' else 'false'})")
    if opt is None:
        sd = {"model": _model_state(model)}
    else:
        _ensure_optimizer_state(opt)
        sd = _sharded_state(model, opt, loading=True)
    same_layout = common["layout"] == _layout()
    if same_layout:
        sd["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(sd, str(path))
    getattr(model[0], "module", model[0]).load_state_dict(loaded["model"])
    if opt is not None:
        opt.load_state_dict(loaded["optimizer"])
        _unshare_adamw_steps(opt)
    return {"step": common["step"], "config": common["config"], "layout": common["layout"],
            "rng": loaded["rng"] if same_layout else None}
