"""Checkpoints through megatron-core ``dist_checkpointing`` (``torch_dist`` backend), written atomically.

Layout of one checkpoint: ``<dir>/step_N/`` is a ``dist_checkpointing`` folder holding

- ``model``: ``model.sharded_state_dict()`` with per-layer keys — every TP-sharded parameter as a ShardedTensor of its
  global tensor, so a checkpoint loads at another tensor-parallel size (replicated parameters are
  written once, by their main replica);
- ``optimizer``: AdamW's ``exp_avg`` / ``exp_avg_sq`` and, for low-precision models, the fp32 master
  weights, each a ShardedTensor mirroring its parameter's sharding (Megatron's
  ``optimizer.state.<name>.<param key>`` keys); AdamW's step counter, shared by all parameters, as a
  common value;
- ``rng``: one ShardedObject per global rank (CPU generator, the TP RNG tracker, CUDA generator);
- common values (rank 0): ``step``, the parallel layout and the run's config.

The LR schedule and the data position are functions of ``step`` (``lr_at``, ``dataset.batch(step)``),
so ``step`` restores them exactly.

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
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                         make_sharded_optimizer_tensor)
from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

from seqpar.megatron.cpu_compat import cpu_checkpoint_request

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
TOKENIZER_FILE = "tokenizer.model"  # the run's sentencepiece model, inside each step folder


class Master(Protocol):
    """What checkpointing needs of ``seqpar.train.loop.MasterParams``."""

    model_params: list[torch.nn.Parameter]
    params: list[torch.nn.Parameter]
    lowp: bool

    def master_to_model(self) -> None: ...


def _layout() -> dict[str, int]:
    return {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "context_parallel": parallel_state.get_context_parallel_world_size(),
            "data_parallel": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer, master: Master,
                   loading: bool) -> dict[str, Any]:
    """Model and optimizer as a sharded state dict. ``loading`` fills it with fresh (zero) buffers of
    the right local shapes for ``dist_checkpointing.load`` instead of the optimizer's live state."""
    # per-layer keys: hybrid patterns put different modules at each layer, which Megatron's stacked
    # (homogeneous) layout cannot describe
    model_sd = model.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    id_map = get_param_id_to_sharded_param_map(model_sd, master.model_params)
    names = {id(p): n for n, p in model.named_parameters()}
    optim: dict[str, Any] = {}
    for i, (param, fp32) in enumerate(zip(master.model_params, master.params)):
        if i not in id_map:
            raise ValueError(f"parameter {names.get(id(param), i)!r} has no entry in model.sharded_state_dict(); "
                             f"its module must implement sharded_state_dict for it")
        state = {} if loading else opt.state[fp32]
        entry = {}
        for k in _ADAM_KEYS:
            buf = torch.zeros_like(fp32.data) if loading else state[k]
            entry[k] = make_sharded_optimizer_tensor(id_map[i], buf, f"optimizer.state.{k}")
        if master.lowp:
            buf = torch.zeros_like(fp32.data) if loading else fp32.data
            entry["fp32_param"] = make_sharded_optimizer_tensor(id_map[i], buf, "optimizer.state.fp32_param")
        optim[str(i)] = entry
    return {"model": model_sd, "optimizer": optim}


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


def save(ckpt_dir: str | pathlib.Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
         master: Master, *, rng: Any, config: dict[str, Any], tokenizer_model: Optional[bytes] = None) -> pathlib.Path:
    """Write step ``step`` (model, AdamW state, master weights, RNG states, config) to
    ``<ckpt_dir>/step_N`` atomically. Collective: every rank calls it. ``tokenizer_model``: the
    run's serialized sentencepiece model, written as ``step_N/tokenizer.model`` (export reads it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names.get(id(mp), str(i)) for i, (mp, p) in enumerate(zip(master.model_params, master.params))
               if not opt.state[p]]
    if missing:
        raise ValueError(f"checkpoint.save: no AdamW state for {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                         f"save after an optimizer step in which every trainable parameter got a gradient")
    steps = {float(opt.state[p]["step"]) for p in master.params}
    if len(steps) != 1:
        raise ValueError(f"AdamW step counters differ across parameters ({sorted(steps)}); cannot checkpoint")
    root = pathlib.Path(ckpt_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    sd = _sharded_state(model, opt, master, loading=False)
    sd.update(rng=_rng_object(rng), adam_step=steps.pop(), step=step, layout=_layout(), config=config)
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


def load(path: pathlib.Path, model: torch.nn.Module, opt: torch.optim.Optimizer, master: Master) -> dict[str, Any]:
    """Load a checkpoint folder into ``model``, ``opt`` and ``master`` at this run's parallel layout
    (the tensor-parallel size may differ from the one it was written with). Returns ``step``,
    ``config``, ``layout`` and ``rng`` — this rank's RNG states, or None when the checkpoint was
    written with another parallel layout (per-rank generator states do not map across layouts)."""
    if not (path / "metadata.json").is_file():
        raise ValueError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json); "
                         f"pass a step_N folder written by seqpar.train")
    common = dist_checkpointing.load_common_state_dict(str(path))
    sd = _sharded_state(model, opt, master, loading=True)
    same_layout = common["layout"] == _layout()
    if same_layout:
        sd["rng"] = _rng_object(None)
    loaded = dist_checkpointing.load(sd, str(path))
    model.load_state_dict(loaded["model"])
    adam_step = torch.tensor(common["adam_step"], dtype=torch.float32)
    state = {i: {"step": adam_step.clone(), **{k: loaded["optimizer"][str(i)][k] for k in _ADAM_KEYS}}
             for i in range(len(master.params))}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    if master.lowp:
        with torch.no_grad():
            for i, p in enumerate(master.params):
                p.copy_(loaded["optimizer"][str(i)]["fp32_param"])
        master.master_to_model()
    return {"step": common["step"], "config": common["config"], "layout": common["layout"],
            "rng": loaded["rng"] if same_layout else None}
