"""Launch configurations of the Triton kernels, per GPU generation: a deterministic default and a
small autotune space.

Every launcher asks :func:`attention_tuning` / :func:`lightning_tuning` for its kernel's
:class:`Tuning` and :func:`launch` to run it. Both tables are per target (:func:`target_arch`):
``90`` for sm_90 and newer (H100), ``86`` for sm_86 .. sm_89 (A40, L40S, RTX 4090: 99 KB of
shared memory per CTA, 100 KB and 48 warps per SM), ``80`` for sm_80 (A100) and older. The target is the CUDA device's compute capability
(``torch.cuda.get_device_capability``), or, inside :func:`compile_target`, the fake target of the
compile-metadata harness (``benchmarks/kernel_resources.py``), so the harness measures exactly
what a real launch on that GPU would use. On CPU (interpreter) the sm_90 table applies.

The configuration (warps, pipeline stages) comes from one of:

* the deterministic default of the kernel at its tile shape, used on CPU (the interpreter, tests),
  when ``SEQPAR_AUTOTUNE=0``, and whenever the kernel carries a debug counter;
* ``triton.autotune`` over the kernel's pruned space on CUDA (default), keyed on the head dim, the
  tile shape, causality, the sliding window (S2 / flash), the GQA ratio (``group``) and the tensors' dtypes.

Every default (d 64 / 128, bf16 / fp16) and every config of a space at the heaviest tiles
compiles for its target without spills, within its shared memory and with >= 2 CTAs or >= 8 warps
per SM (``benchmarks/kernel_resources.py [--space]``; ``tests/test_kernel_resources.py`` asserts it
for sm_90, sm_80 and sm_86).
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


@dataclass(frozen=True)
class Tuning:
    """What a launcher runs a kernel with: ``default`` (first of ``space``), the autotune
    ``space``, and ``block_m``: a row-tile override for the kernel (None: the launcher's tile)."""

    default: LaunchConfig
    space: tuple[LaunchConfig, ...]
    block_m: Optional[int] = None


def _t(default: LaunchConfig, *others: LaunchConfig, block_m: Optional[int] = None) -> Tuning:
    return Tuning(default, (default, *others), block_m)


W4S1, W4S2, W4S3, W8S1, W8S2, W8S3 = (cfg(w, s) for w in (4, 8) for s in (1, 2, 3))

# Attention kernels (S2 / flash share "s2"; MoH gathers rows and needs a few more registers),
# keyed (target, tile class, op, kernel). Tile class by one operand tile's bytes (block x padded
# head dim x element size): "s" <= 8 KB (d <= 64 half), "m" <= 16 KB (d = 128 half, d = 64 fp32),
# "l" beyond. Chosen from compile metadata (benchmarks/kernel_resources.py --targets 90 80):
# sm_90 (wgmma): at 64 x 128 half tiles 4 warps hold the fwd / dq accumulators in ~250 registers
#   and dk/dv spills, so 8 warps; 3 stages of 64 x 128 dq tiles need 129 KB (1 CTA of 4 warps),
#   2 stages 97 KB; MoH dq spills 20 B at 4 warps.
# sm_80 (mma.sync accumulators cost more registers): d = 128 dk/dv spills 12-1000 B at every
#   (warps, stages) but 8 warps / 1 stage (173 regs); MoH dk/dv spills at every config of the
#   64 x 64 tile (228-12360 B) and is clean with 32-row tiles at 8 warps (222-235 regs); 4 warps /
#   3 stages at d = 128 take 88-104 KB (1 CTA of 4 warps); 8 warps / 2 stages dq of non-causal
#   flash spills 4 B (ptxas stops at 128 registers), 4 warps / 2 stages do not (255). At d = 64,
#   4 warps / 2 stages spills in dq / dk/dv (4-156 B), non-causal dk/dv spills 8 B at 3 stages and
#   MoH dq 8 B at 4 warps / 3 stages. MoH dk/dv at d = 64 (with the varlen document bounds) spills at
#   every config of 64-row (24-172 B) and 32-row (4-24 B) query tiles; 16-row tiles at 4 warps / 3
#   stages are clean (254 registers, 22 KB, 2 CTA/SM).
_ATTENTION: dict[tuple[int, str, str, str], Tuning] = {
    (90, "s", "s2", "fwd"): _t(W4S3, W4S2, W8S2, W8S3),
    (90, "s", "s2", "dq"): _t(W4S3, W4S2, W8S2, W8S3),
    (90, "s", "s2", "dkdv"): _t(W4S3, W4S2, W8S2, W8S3),
    (90, "m", "s2", "fwd"): _t(W8S2, W4S2, W4S3, W8S3),
    (90, "m", "s2", "dq"): _t(W8S2, W4S2, W8S3),
    (90, "m", "s2", "dkdv"): _t(W8S2, W8S3),
    (90, "m", "moh", "dq"): _t(W8S2, W8S3),
    (90, "l", "s2", "fwd"): _t(W8S2),
    (90, "l", "s2", "dq"): _t(W8S2),
    (90, "l", "s2", "dkdv"): _t(W8S2),
    (80, "s", "s2", "fwd"): _t(W4S3, W4S2, W8S2, W8S3),
    (80, "s", "s2", "dq"): _t(W4S3, W8S2, W8S3, W4S1),
    (80, "s", "s2", "dkdv"): _t(W8S2, W4S1, W8S1),
    (80, "s", "moh", "dq"): _t(W8S2, W8S3, W4S1),
    (80, "s", "moh", "dkdv"): _t(W4S3, W8S3, block_m=16),
    (80, "m", "s2", "fwd"): _t(W8S2, W4S2, W8S3),
    (80, "m", "s2", "dq"): _t(W4S2, W8S1, W8S3),
    (80, "m", "s2", "dkdv"): _t(W8S1),
    (80, "m", "moh", "fwd"): _t(W8S2, W8S1, W8S3),
    (80, "m", "moh", "dq"): _t(W8S2, W4S2, W8S3),
    (80, "m", "moh", "dkdv"): _t(W8S2, W8S1, W8S3, block_m=32),
    (80, "l", "s2", "fwd"): _t(W8S2),  # fp32 d = 128 tiles: not a training dtype, not tuned for
    (80, "l", "s2", "dq"): _t(W8S2),
    (80, "l", "s2", "dkdv"): _t(W8S2),
}
# sm_86 / sm_89 (A40, L40S, RTX 4090: 99 KB shared memory per CTA, 100 KB and 48 warps per SM;
# measured with benchmarks/kernel_resources.py --targets 86 --space): sm_80's table, except where a
# config breaks the rule there. dq of 64-row tiles at 4 warps hold 1 CTA of 4 warps (52 / 72 KB of
# shared memory in 100 KB), so 8 warps; 4 warps / 2 stages dq at d = 64 spills 4 B; at d = 128 the
# 4-warp forward and MoH dq keep 1 CTA of 4 warps and 8 warps / 3 stages need 104 KB; MoH dk/dv at
# d = 64 spills 20-156 B at every config of its 64 x 64 tile, so it runs 32-row query tiles as sm_80
# does at d = 128 (there 4 warps / 2 stages and 8 warps / 1 stage spill 8-16 B); MoH's forward
# spills 8-12 B at 8 warps (d = 64). S2 dk/dv at d = 64 spills 8-16 B at 2-3 stages, so 1 stage.
_ATTENTION.update({(86, *k[1:]): v for k, v in _ATTENTION.items() if k[0] == 80})
_ATTENTION.update({
    (86, "m", "s2", "fwd"): _t(W8S2, W8S3),
    (86, "s", "s2", "dq"): _t(W8S2, W4S1, W8S1, W8S3),
    (86, "s", "s2", "dkdv"): _t(W8S1, W4S1),
    (86, "m", "s2", "dq"): _t(W8S2, W8S1),
    (86, "s", "moh", "fwd"): _t(W4S3, W4S2),
    (86, "m", "moh", "dq"): _t(W8S2),
    (86, "s", "moh", "dkdv"): _t(W4S3, W4S1, W8S2, W8S3, block_m=32),
})
# Sliding-window flash (op "window": the WINDOW specialisation adds a lower-edge compare to each
# masked tile, a few registers more than causal). It uses S2 / flash's entry of its target except
# where a config of that entry breaks the rule under the window (benchmarks/kernel_resources.py
# --cases "flash window" --space, every config at d = 64 and 128, bf16 and fp16): sm_90 dk/dv at
# d = 128 spills 4 B at 8 warps / 2 stages (255 registers; 4 warps: 96-296 B) and is clean at 8 warps
# / 3 stages (254 registers, 105.5 KB) and 1 stage (231, 73 KB); sm_80 dq at d = 64 spills 8 B at
# 4 warps / 2-3 stages, dk/dv at d = 64 4 B at 4 warps / 1 stage. sm_86's entries are clean under the
# window. A default replaced here is the best clean config by the harness's occupancy proxy: most
# resident warps per SM, then most pipeline stages, then fewest registers.
_ATTENTION.update({
    (90, "m", "window", "dkdv"): _t(W8S3, W8S1),
    (80, "s", "window", "dq"): _t(W8S3, W8S2, W4S1),
    (80, "s", "window", "dkdv"): _t(W8S2, W8S1),
})

# Lightning: "chunk" = the chunk-parallel output / dv / dq-dk kernels (two [C, C] / [C, 64] fp32
# accumulators), "state" = the chunk-local state product. sm_90: 8 warps / 3 stages keep every
# CTA count of the 8 warps / 2 stages build before 32-bit chunk offsets (2 stages now lose a CTA
# in fp16 dq/dk), the state product holds 32 warps per SM at 8 warps (24 at 4); sm_80: 4 warps /
# 2 stages is clean for every kernel, dtype and head dim (8 warps / 2 stages: 4 B in the bf16
# d = 128 output; 8 warps / 3 stages: clean, 1 CTA).
_LIGHTNING: dict[tuple[int, str], Tuning] = {
    (90, "chunk"): _t(W8S3, W8S2, W4S2),
    (90, "state"): _t(W8S2, W4S2),
    (80, "chunk"): _t(W4S2, W8S3),
    (80, "state"): _t(W4S2, W8S2),
    (86, "chunk"): _t(W4S2, W8S3),  # as sm_80 (dq/dk at d = 128 spills at 1 stage, 4 warps / 3 stages: 1 CTA)
    (86, "state"): _t(W4S2, W8S2),
}

# every config the harness can force, i.e. the union of all spaces
ALL_CONFIGS = tuple(sorted({c for t in (*_ATTENTION.values(), *_LIGHTNING.values()) for c in t.space},
                           key=lambda c: (c.num_warps, c.num_stages)))

_TARGET: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("seqpar_compile_target", default=None)


@contextlib.contextmanager
def compile_target(capability: int) -> Iterator[None]:
    """Pick launch configs for compute capability ``capability`` (e.g. 80) for launches on
    non-CUDA tensors: the compile-metadata harness compiles for a fake target from CPU tensors."""
    tok = _TARGET.set(int(capability))
    try:
        yield
    finally:
        _TARGET.reset(tok)


def target_capability(device) -> Optional[int]:
    """Compute capability (``major * 10 + minor``) a launch on ``device`` compiles for: the CUDA
    device's, else the :func:`compile_target` in effect, else None (CPU interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return _TARGET.get()


def target_arch(device) -> int:
    """Which table applies: 90 (sm_90 and newer, and CPU), 86 (sm_86 .. sm_89: 99 KB of shared
    memory per CTA, 100 KB and 48 warps per SM) or 80 (sm_80 and older)."""
    cap = target_capability(device)
    if cap is None or cap >= 90:
        return 90
    return 86 if cap >= 86 else 80


def tile_class(block: int, head_dim: int, dtype: torch.dtype) -> str:
    """"s" / "m" / "l" by the bytes of one [block, padded head dim] operand tile."""
    import triton

    nbytes = block * max(16, triton.next_power_of_2(head_dim)) * dtype.itemsize
    return "s" if nbytes <= 8 * 1024 else ("m" if nbytes <= 16 * 1024 else "l")


def attention_tuning(kind: str, block: int, head_dim: int, dtype: torch.dtype, device, op: str = "s2") -> Tuning:
    """:class:`Tuning` of attention kernel ``kind`` ("fwd", "dq", "dkdv") of ``op`` ("s2", which
    includes flash; "window", flash with a sliding window; or "moh") at ``block``-token tiles, for
    the target of ``device``. "window" and "moh" use S2's entry where they have none of their own."""
    key = (target_arch(device), tile_class(block, head_dim, dtype))
    return _ATTENTION.get((*key, op, kind)) or _ATTENTION[(*key, "s2", kind)]


def lightning_tuning(kind: str, device) -> Tuning:
    """:class:`Tuning` of Lightning's "chunk" kernels (output, dv, dq/dk) or "state" product."""
    return _LIGHTNING[(target_arch(device), kind)]


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


_RECORD: contextvars.ContextVar[Optional[tuple[list, bool]]] = contextvars.ContextVar("seqpar_launch_record",
                                                                                   default=None)


@contextlib.contextmanager
def record_launches(run: bool = True) -> Iterator[list]:
    """Record ``(kernel name, grid)`` of every launch inside the block (tests: the grids the
    launchers really use). ``run=False`` records without launching (outputs stay uninitialised)."""
    found: list = []
    tok = _RECORD.set((found, run))
    try:
        yield found
    finally:
        _RECORD.reset(tok)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def launch(kernel, grid, args: Sequence, consts: dict, *, default: LaunchConfig,
           space: Sequence[LaunchConfig], key: Sequence[str], device: torch.device,
           tunable: bool = True) -> None:
    """Run ``kernel[grid](*args, **consts)`` with the config chosen as the module docstring says.

    ``default`` must be in ``space``; ``key`` names kernel arguments (constexprs or ints) that
    decide the best config; ``tunable=False`` (debug counters, atomics, kernels with one config)
    pins the default. Every Triton kernel of seqpar launches through here.
    """
    assert default in space, (default, space)
    rec = _RECORD.get()
    if rec is not None:
        rec[0].append((kernel_name(kernel), tuple(grid)))
        if not rec[1]:
            return
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
