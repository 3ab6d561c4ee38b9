"""Launch configurations of the Triton kernels: a deterministic default and a small autotune space.

Every launcher asks :func:`launch` to run its kernel. The configuration (warps, pipeline stages)
comes from one of:

* the deterministic default of the kernel at its tile shape, used on CPU (the interpreter, tests),
  when ``SEQPAR_AUTOTUNE=0``, and whenever the kernel carries a debug counter;
* ``triton.autotune`` over the kernel's pruned space on CUDA (default), keyed on the head dim, the
  tile shape, causality, the GQA ratio (``group``) and the tensors' dtypes. Every config in a
  space compiles for sm_90 without spills and with >= 2 CTAs or >= 8 warps per SM
  (``benchmarks/kernel_resources.py --space``; ``tests/test_kernel_resources.py`` asserts it).

Kernels whose outputs are pure stores (no accumulation into their inputs) are the only ones
tuned, so re-running a config while benchmarking is harmless.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch


@dataclass(frozen=True)
class LaunchConfig:
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"{self.num_warps}w{self.num_stages}s"

    def kwargs(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def cfg(warps: int, stages: int) -> LaunchConfig:
    return LaunchConfig(warps, stages)


# every config the harness can force, i.e. the union of all spaces
ALL_CONFIGS = tuple(cfg(w, s) for w in (4, 8) for s in (2, 3))

_FORCED: contextvars.ContextVar[Optional[LaunchConfig]] = contextvars.ContextVar("seqpar_forced_config",
                                                                                  default=None)


def autotune_enabled(device: torch.device) -> bool:
    """Autotune on CUDA unless ``SEQPAR_AUTOTUNE=0``; never on CPU (interpreter)."""
    if torch.device(device).type != "cuda":
        return False
    return os.environ.get("SEQPAR_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def forced(config: LaunchConfig) -> Iterator[None]:
    """Launch every kernel whose space contains ``config`` with it (compile-metadata harness)."""
    tok = _FORCED.set(config)
    try:
        yield
    finally:
        _FORCED.reset(tok)


def force_each_config():
    """(label, context-manager factory) per config of :data:`ALL_CONFIGS`, for the harness."""
    for c in ALL_CONFIGS:
        yield c.label, (lambda c=c: forced(c))


_TUNERS: dict = {}


def _tuner(kernel, space: tuple[LaunchConfig, ...], key: tuple[str, ...]):
    import triton

    k = (id(kernel), space, key)
    if k not in _TUNERS:
        configs = [triton.Config({}, num_warps=c.num_warps, num_stages=c.num_stages) for c in space]
        _TUNERS[k] = triton.autotune(configs=configs, key=list(key))(kernel)
    return _TUNERS[k]


def launch(kernel, grid, args: Sequence, consts: dict, *, default: LaunchConfig,
           space: Sequence[LaunchConfig], key: Sequence[str], device: torch.device,
           tunable: bool = True) -> None:
    """Run ``kernel[grid](*args, **consts)`` with the config chosen as the module docstring says.

    ``default`` must be in ``space``; ``key`` names kernel arguments (constexprs or ints) that
    decide the best config; ``tunable=False`` (debug counters, atomics) pins the default.
    """
    assert default in space, (default, space)
    forced_cfg = _FORCED.get()
    if forced_cfg is not None:
        if forced_cfg in space:
            kernel[grid](*args, **consts, **forced_cfg.kwargs())
        return
    if tunable and len(space) > 1 and autotune_enabled(device):
        _tuner(kernel, tuple(space), tuple(key))[grid](*args, **consts)
    else:
        kernel[grid](*args, **consts, **default.kwargs())


Space = Callable[..., tuple[LaunchConfig, tuple[LaunchConfig, ...]]]
