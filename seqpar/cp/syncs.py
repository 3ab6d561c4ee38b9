"""Counting host syncs: every device-to-host read and every host-to-device copy of a block of code.

:func:`count_host_syncs` watches *operations*, not call sites: a ``TorchDispatchMode`` sees every
aten op the block runs (whoever issues it: seqpar, megatron-core, torch.nn, autograd's backward),
and a ``TorchFunctionMode`` sees the tensor methods that read host memory without an aten op.
What counts, and why it is a sync (or a copy) on a GPU:

reads (device -> host)
    ``item()`` / ``bool()`` / ``int()`` / ``float()`` / f-strings (``aten._local_scalar_dense``),
    ``torch.equal``, ops whose output size depends on the data (``nonzero``, boolean-mask indexing
    and assignment, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
    ``bincount``), ``.tolist()``, ``.numpy()``, ``.cpu()``, and every copy from a device to the CPU.
copies (host -> device)
    tensors made from host data (``torch.tensor``, ``torch.as_tensor``, ``Tensor.new_tensor``,
    ``torch.from_numpy``, indexing with a Python list: ``aten.lift_fresh``), every copy from the
    CPU to another device, and, issued by seqpar's own code (``seqpar/``, ``kernels/``, ``models/``),
    every ``.to(device)`` / ``.cuda()`` / ``.copy_(src)`` of a CPU tensor that existed before the block
    (a buffer, a cached table, a constant) even when the target is the CPU: on a CPU-only machine that
    is a no-op, but it is where a GPU run would copy (a module that keeps a buffer on the host and
    moves it per call is caught without a GPU). A tensor the block computed (or a view of one) lives
    where the compute runs, so moving it within that device is not counted; nor are other libraries'
    same-device moves (DeepSpeed copying gradients into its buckets: device-to-device on a GPU).

Not counted: work that only the CPU build runs — the Triton interpreter's emulation of a kernel
(its argument copies), and the plain-torch fallbacks of the kernels (``backend="torch"``:
``kernels/s2/torch_impl.py``, ``kernels/moh/torch_impl.py``, ``kernels/lightning/chunked.py``),
which a GPU never runs; those are tallied in :attr:`SyncCount.excluded` with their sites. The
kernels' entries, plans, launchers and autograd Functions are all counted.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the ground truth for reads; it does not
see host-to-device copies, which this counter does on any device.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCount", "count_host_syncs"]


@dataclass
class SyncCount:
    """Host reads (device -> host) and host-to-device copies seen in a :func:`count_host_syncs` block,
    with their call sites (``"<what> <file>:<line>"``, the innermost frame outside torch)."""

    reads: int = 0
    copies: int = 0
    sites: list = field(default_factory=list)
    excluded: list = field(default_factory=list)  # CPU-only work (interpreter, torch fallbacks)

    @property
    def total(self) -> int:
        return self.reads + self.copies


_aten = torch.ops.aten
# ops that read device memory on the host (their result, or their output's size, is data)
_READ_OPS = {
    _aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default,
    _aten.nonzero.default, _aten.nonzero.out, _aten.argwhere.default, _aten.masked_select.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.bincount.default,
}
_HOST_DATA_OPS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default, _aten._copy_from.default,
             _aten._copy_from_and_resize.default}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
              _aten._index_put_impl_.default}
# tensor methods that read host memory (no aten op on CPU) or move a tensor to a device
_READ_METHODS = {"tolist", "numpy", "__array__", "cpu"}
_MOVE_METHODS = {"to", "cuda", "copy_", "pin_memory"}

_FRESH: dict = {}  # aten op -> whether its outputs are new storage (no alias of an input)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS = os.path.abspath(__file__)


def _cpu_only_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(path prefixes of the Triton interpreter, files of the kernels' CPU fallbacks)."""
    import seqpar.kernels as k_pkg

    interp = ()
    try:
        import triton.runtime.interpreter as ti

        interp = (os.path.abspath(ti.__file__),)
    except Exception:  # pragma: no cover - triton is a dependency
        pass
    kd = os.path.dirname(os.path.abspath(k_pkg.__file__))
    fallbacks = tuple(os.path.join(kd, p) for p in ("s2/torch_impl.py", "moh/torch_impl.py", "lightning/chunked.py"))
    return interp, fallbacks


def _seqpar_dirs() -> tuple[str, ...]:
    """Source folders of seqpar's own code (the package, its kernels and models), found without
    importing them (seqpar.cp may not import seqpar.models)."""
    import importlib.util

    specs = (importlib.util.find_spec(n) for n in ("seqpar", "seqpar.kernels", "seqpar.models"))
    return tuple(os.path.dirname(os.path.abspath(s.origin)) + os.sep for s in specs if s is not None and s.origin)


def _device_of(x) -> Optional[torch.device]:
    if isinstance(x, torch.device):
        return x
    if isinstance(x, str):
        try:
            return torch.device(x)
        except RuntimeError:
            return None
    if isinstance(x, int) and not isinstance(x, bool):
        return torch.device("cuda", x)
    if isinstance(x, torch.Tensor):
        return x.device
    return None


def _move_target(name: str, args: tuple, kwargs: dict) -> Optional[torch.device]:
    """The device a ``.to`` / ``.cuda`` / ``.copy_`` / ``.pin_memory`` call targets (None: no device move)."""
    if name == "cuda":
        return torch.device("cuda")
    if name == "pin_memory":
        return torch.device("cuda")  # pinned host memory exists for device copies only
    if name == "copy_":
        return args[0].device if len(args) > 0 and isinstance(args[0], torch.Tensor) else None
    dev = kwargs.get("device")
    if dev is not None:
        return _device_of(dev)
    for a in args[1:2]:  # Tensor.to(device | dtype | tensor, ...): the first argument after self
        if isinstance(a, torch.dtype):
            return None
        return _device_of(a)
    return None


class _Counter:
    def __init__(self) -> None:
        self.count = SyncCount()
        self.interp, self.fallbacks = _cpu_only_dirs()
        self.ours = _seqpar_dirs()
        self.local = threading.local()
        self.made: set = set()  # CPU storages (data pointers) that ops of the block allocated

    def record(self, func, out) -> None:
        """Remember the CPU storages ``func`` allocated (outputs that alias an input are not new)."""
        fresh = _FRESH.get(func)
        if fresh is None:
            fresh = _FRESH[func] = all(r.alias_info is None for r in func._schema.returns)
        if not fresh:
            return
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                self.made.add(t.untyped_storage().data_ptr())

    def computed(self, t: torch.Tensor) -> bool:
        """True when ``t``'s storage was allocated inside the block (it is not pre-existing host state)."""
        return t.untyped_storage().data_ptr() in self.made

    # where an op comes from: skip torch's and this file's frames
    def classify(self) -> tuple[Optional[str], bool]:
        """(site, excluded) of the current op."""
        f = sys._getframe(2)
        site = None
        excluded = False
        while f is not None:
            fn = f.f_code.co_filename
            if fn in self.interp or fn in self.fallbacks:
                excluded = True
                if site is None:
                    site = f"{fn}:{f.f_lineno}"
                break
            if site is None and not fn.startswith(_TORCH_DIR) and os.path.abspath(fn) != _THIS:
                site = f"{fn}:{f.f_lineno}"
            f = f.f_back
        return site or "?", excluded

    def add(self, kind: str, what: str, seqpar_only: bool = False) -> None:
        """Count one event; ``seqpar_only``: only when issued by seqpar's own code."""
        if getattr(self.local, "quiet", 0):
            return
        site, excluded = self.classify()
        if seqpar_only and not os.path.abspath(site.rsplit(":", 1)[0]).startswith(self.ours):
            return
        entry = f"{what} {site}"
        if excluded:
            self.count.excluded.append(entry)
        elif kind == "read":
            self.count.reads += 1
            self.count.sites.append(entry)
        else:
            self.count.copies += 1
            self.count.sites.append(entry)

    @contextlib.contextmanager
    def quiet(self):
        # an op counted at the method level (e.g. ``.to``) is not counted again by its aten ops
        self.local.quiet = getattr(self.local, "quiet", 0) + 1
        try:
            yield
        finally:
            self.local.quiet -= 1


class _Methods(TorchFunctionMode):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self_t is not None and name == "__setitem__" and len(args) > 2 and isinstance(args[2], (int, float, bool)):
            # ``x[i] = 0.5``: the scalar becomes a CPU tensor on every device (for a GPU tensor too:
            # index_put_ then runs as masked_fill_ with a host scalar), not a copy of host data
            self.c.local.scalar_setitem = getattr(self.c.local, "scalar_setitem", 0) + 1
            try:
                return func(*args, **kwargs)
            finally:
                self.c.local.scalar_setitem -= 1
        if self_t is not None and name in _READ_METHODS:
            self.c.add("read", f"Tensor.{name}")
            with self.c.quiet():
                return func(*args, **kwargs)
        if self_t is not None and name in _MOVE_METHODS:
            src = args[1] if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) else self_t
            dst = self_t.device if name == "copy_" else _move_target(name, args, kwargs)
            if dst is not None and src.device.type == "cpu" and not (dst.type == "cpu" and self.c.computed(src)):
                # a CPU source moved to a device; to the CPU itself only pre-existing host state moved by
                # seqpar's code (see above)
                self.c.add("copy", f"Tensor.{name} cpu->{dst}", seqpar_only=dst.type == "cpu")
                with self.c.quiet():
                    return func(*args, **kwargs)
            if dst is not None and dst.type == "cpu" and src.device.type != "cpu":
                self.c.add("read", f"Tensor.{name} {src.device}->cpu")
                with self.c.quiet():
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


def _bool_index_reads(func, args: tuple, kwargs: dict) -> bool:
    """True when an index op with a boolean mask needs the mask's nonzero count on the host.
    ``index_put_`` of one host scalar under one mask runs as ``masked_fill_`` (no read), as ATen's
    ``canDispatchToMaskedFill`` decides."""
    idx = args[1] if len(args) > 1 else None
    if not isinstance(idx, (list, tuple)):
        return False
    masks = [i for i in idx if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
    if not masks:
        return False
    if func is not _aten.index.Tensor:
        value = args[2] if len(args) > 2 else kwargs.get("values")
        accumulate = (args[3] if len(args) > 3 else kwargs.get("accumulate", False))
        defined = [i for i in idx if i is not None]
        if (not accumulate and isinstance(value, torch.Tensor) and value.numel() == 1
                and value.device.type == "cpu" and len(defined) == 1 and defined[0].dtype == torch.bool):
            return False
    return True


class _Ops(TorchDispatchMode):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if func in _READ_OPS:
            self.c.add("read", name)
        elif func in _HOST_DATA_OPS:
            if not (getattr(self.c.local, "scalar_setitem", 0) and args and args[0].dim() == 0):
                self.c.add("copy", f"{name} (tensor from host data)")
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.c.add("read", f"{name} without output_size")
        elif func in _INDEX_OPS and _bool_index_reads(func, args, kwargs):
            self.c.add("read", f"{name} with a boolean mask")
        elif func in _COPY_OPS:
            src = args[1] if func is not _aten._to_copy.default and len(args) > 1 else args[0]
            dst = kwargs.get("device") if func is _aten._to_copy.default else args[0].device
            if func is _aten._copy_from.default or func is _aten._copy_from_and_resize.default:
                src, dst = args[0], args[1].device
            if isinstance(src, torch.Tensor) and dst is not None:
                dst = torch.device(dst)
                if src.device.type == "cpu" and dst.type != "cpu":
                    self.c.add("copy", f"{name} cpu->{dst}")
                elif src.device.type != "cpu" and dst.type == "cpu":
                    self.c.add("read", f"{name} {src.device}->cpu")
        out = func(*args, **kwargs)
        self.c.record(func, out)
        return out


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count every host read and every host-to-device copy made inside the block (module docstring:
    what counts and what is excluded), by any code: seqpar, megatron-core, torch.nn, autograd.

    >>> with cp.count_host_syncs() as n:
    ...     with cp.step_checks():
    ...         model(batch).sum().backward()
    >>> n.reads, n.copies, n.sites      # sites: "<op> <file>:<line>"

    Debug tool (tests, benchmarks): every torch call in the block goes through two Python modes.
    """
    counter = _Counter()
    with _Methods(counter), _Ops(counter):
        yield counter.count
