"""Explicit, opt-in CPU compatibility for megatron-core 0.16.x (Python 3.11).

megatron-core assumes CUDA in a handful of places that a CPU/gloo run reaches. Nothing here runs at
import time; ``enable_cpu_compat()`` applies the changes below and refuses to run when CUDA is
available, so a GPU run is never affected. Call it once per process before building a model.

What it changes (and why):

- ``torch.cuda.current_device`` returns ``"cpu"``: megatron allocates buffers with
  ``device=torch.cuda.current_device()`` and moves RoPE's ``inv_freq`` there on the first forward;
  on CPU-only torch that call raises.
- The tensor-parallel RNG tracker becomes ``CpuRNGStatesTracker`` (forks the CPU generator):
  Megatron's tracker saves/restores ``torch.cuda`` RNG states around dropout and initialisation.
- ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` return None / do nothing:
  activation recompute (``tensor_parallel.checkpoint``, i.e. ``model.recompute``) saves and restores the
  CUDA generator around the recomputed forward; the CPU generator and the tracker above are saved
  by the same call and are the only generators a CPU run has.
- ``get_pos_emb_on_this_cp_rank`` (RoPE zigzag slicing under CP) stays on the embedding's device:
  the original builds a pinned index and moves it with ``.cuda()``.
- ``torch`` as seen by a few megatron-core modules (:data:`_CUDA_DEFAULT_MODULES`: the pipeline schedules,
  the optimizers, grad clipping, ``megatron.core.utils``) is a proxy whose tensor factories
  (``zeros``/``ones``/``empty``/``full``/``tensor``) map ``device="cuda"`` to the CPU. Those modules
  create scalars with a hard-coded ``device="cuda"`` (e.g. ``total_num_tokens`` in
  ``forward_backward_no_pipelining`` / ``..._pipelining_without_interleaving``, ``found_inf`` in
  ``MixedPrecisionOptimizer``, the dummy overflow buffer and the norm in ``get_grad_norm_fp32``,
  ``local_multi_tensor_l2_norm``'s result). Every other attribute is the real ``torch``.
- ``Tensor.type()`` called without arguments *from megatron.core.optimizer* on a CPU tensor answers the
  CUDA type name (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``): ``Float16OptimizerWithFloat16Params``
  and ``DistributedOptimizer`` sort parameters into fp32 / fp16-bf16 groups by comparing ``param.type()``
  with ``'torch.cuda.FloatTensor'`` etc. and raise TypeError on anything else, and
  ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``. Other callers
  (any frame outside megatron.core.optimizer) get the true answer.
- Checkpoint writer: :func:`cpu_checkpoint_request` drops the host-staging step of a
  ``dist_checkpointing`` save request (a non-blocking device-to-host copy followed by
  ``torch.cuda.synchronize()``, which CPU-only torch cannot run; on CPU the tensors are already on
  the host). ``seqpar.train.checkpoint`` applies it only when CUDA is absent.

``disable_cpu_compat()`` restores the originals (tests use it to stay hermetic).

Not here, because it is not a CPU matter: torch AdamW's ``step`` on loading a distributed-optimizer
checkpoint (megatron's torch-optimizer fallback, CPU and GPU alike) is fixed by
``seqpar.megatron.optimizer`` on every optimizer seqpar builds.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any, Iterator

import torch

_SAVED: dict[str, tuple[Any, str, Any]] = {}


class CpuRNGStatesTracker:
    """Megatron's ``CudaRNGStatesTracker`` contract (add / fork / get_states / set_states / reset)
    over the CPU default generator."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _cpu_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_CUDA_DEFAULT_MODULES = ("megatron.core.pipeline_parallel.schedules", "megatron.core.optimizer.optimizer",
                         "megatron.core.optimizer.clip_grads", "megatron.core.optimizer.distrib_optimizer",
                         "megatron.core.utils")
"""megatron-core modules that allocate with a hard-coded ``device="cuda"`` on the paths a CPU run takes."""


def _cpu_device(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


def _factory(fn: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA runtime
        return fn(*args, **kwargs)

    make.__name__ = fn.__name__
    return make


class _CpuTorch(types.ModuleType):
    """``torch`` for the modules in ``_CUDA_DEFAULT_MODULES``: the factories put "cuda" tensors on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in ("zeros", "ones", "empty", "full", "tensor"):
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TENSOR_TYPE = torch.Tensor.type


def _megatron_optimizer_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    out = _TENSOR_TYPE(self, *args, **kwargs)
    if (not args and not kwargs and self.device.type == "cpu"
            and sys._getframe(1).f_globals.get("__name__", "").startswith("megatron.core.optimizer")):
        return out.replace("torch.", "torch.cuda.", 1)
    return out


def _patch(key: str, owner: Any, attr: str, new: Any) -> None:
    if key not in _SAVED:
        _SAVED[key] = (owner, attr, getattr(owner, attr))
    setattr(owner, attr, new)


def enable_cpu_compat() -> None:
    """Make megatron-core 0.16 run on CPU (gloo). Raises RuntimeError if CUDA is available."""
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_compat() is for CPU-only runs; CUDA is available, do not call it")
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.tensor_parallel import random as tp_random

    _patch("current_device", torch.cuda, "current_device", lambda: "cpu")
    _patch("rope_cp", rope_utils, "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank)
    _patch("rope_cp2", rotary_pos_embedding, "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank)
    _patch("rng", tp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker())
    _patch("rng_init", tp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _patch("cuda_rng_get", tp_random, "_get_cuda_rng_state", lambda *args, **kwargs: None)
    _patch("cuda_rng_set", tp_random, "_set_cuda_rng_state", lambda *args, **kwargs: None)
    cpu_torch = _CpuTorch()
    for name in _CUDA_DEFAULT_MODULES:
        _patch(f"torch@{name}", importlib.import_module(name), "torch", cpu_torch)
    _patch("tensor_type", torch.Tensor, "type", _megatron_optimizer_type)


def cpu_checkpoint_request(request: Any) -> Any:
    """A megatron-core ``AsyncRequest`` from ``dist_checkpointing.save(..., async_sharded_save=True)``
    without its host-staging step (see the module docstring). CPU-only: raises with CUDA present."""
    if torch.cuda.is_available():
        raise RuntimeError("cpu_checkpoint_request() is for CPU-only runs; keep the staging step on GPU")
    return request._replace(preload_fn=None)


def cpu_compat_enabled() -> bool:
    return bool(_SAVED)


def disable_cpu_compat() -> None:
    """Restore every original that ``enable_cpu_compat`` replaced."""
    for owner, attr, orig in _SAVED.values():
        setattr(owner, attr, orig)
    _SAVED.clear()


def model_parallel_seed(seed: int) -> None:
    """CPU counterpart of ``model_parallel_cuda_manual_seed``: seeds the CPU generator and the tracker
    states Megatron forks (tensor-parallel state offset by the TP rank, as Megatron does)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank + 1)
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
