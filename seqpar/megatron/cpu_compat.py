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
- ``get_pos_emb_on_this_cp_rank`` (RoPE zigzag slicing under CP) stays on the embedding's device:
  the original builds a pinned index and moves it with ``.cuda()``.
- Checkpoint writer: :func:`cpu_checkpoint_request` drops the host-staging step of a
  ``dist_checkpointing`` save request (a non-blocking device-to-host copy followed by
  ``torch.cuda.synchronize()``, which CPU-only torch cannot run; on CPU the tensors are already on
  the host). ``seqpar.train.checkpoint`` applies it only when CUDA is absent.

``disable_cpu_compat()`` restores the originals (tests use it to stay hermetic).
"""

from __future__ import annotations

import contextlib
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
