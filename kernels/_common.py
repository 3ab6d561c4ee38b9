"""Input validation and backend selection shared by every seqpar kernel.

Every public op validates here, before any kernel launch, and raises ``ValueError`` whose
message names the argument and the fix. Tensors are ``[batch, seq, heads, dim]``; varlen is
``batch == 1`` plus ``cu_seqlens`` (int32, ``[num_docs + 1]``, starts at 0, strictly increasing,
ends at ``seq``).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Optional, Union

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")


def interpret_enabled() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a ``@triton.jit`` function is defined (at import), so it must
    be set before ``seqpar.kernels`` is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but be kind
        return False
    return True


def select_backend(backend: Optional[str], *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for tensors on one device.

    auto: Triton on CUDA, or on CPU when the Triton interpreter is enabled; the torch
    implementation otherwise (CPU without the interpreter).
    """
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = tensors[0].device
    if backend == "torch":
        return "torch"
    can_triton = triton_available() and (dev.type == "cuda" or (dev.type == "cpu" and interpret_enabled()))
    if backend == "triton":
        if not can_triton:
            raise ValueError(
                f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors "
                f"(got device {dev}); use backend='torch' or 'auto'"
            )
        return "triton"
    return "triton" if can_triton else "torch"


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_qkv(q, k, v, *, same_dv: bool = True) -> tuple[int, int, int, int, int, int]:
    """Validate ``q [b, sq, h, d]``, ``k [b, sk, hk, d]``, ``v [b, sk, hk, dv]``.

    Returns ``(batch, seq_q, seq_k, heads, kv_heads, head_dim)``. ``same_dv`` requires
    ``dv == d`` (softmax kernels); linear attention allows ``dv != d``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, sq, h, d = q.shape
    bk, sk, hk, dk = k.shape
    bv, sv, hv, dv = v.shape
    if bk != b or bv != b:
        raise ValueError(f"batch mismatch: q {b}, k {bk}, v {bv}")
    if sv != sk:
        raise ValueError(f"k and v must have the same seq length, got {sk} and {sv}")
    if hv != hk:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    if same_dv and dv != d:
        raise ValueError(f"v head dim {dv} must equal q/k head dim {d} for this op")
    if hk < 1 or h % hk != 0:
        raise ValueError(
            f"num_kv_heads ({hk}, k.shape[2]) must divide num_heads ({h}, q.shape[2]) for GQA"
        )
    if b < 1 or sq < 1 or sk < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return b, sq, sk, h, hk, d


def check_cu_seqlens(cu_seqlens, batch: int, seq: int, *, name: str = "cu_seqlens") -> Optional[torch.Tensor]:
    """Validate varlen boundaries: int32 ``[num_docs + 1]``, 0 first, strictly increasing,
    last == ``seq``, and ``batch == 1``. Returns it (on its device) or None.

    This reads ``cu_seqlens`` on the host once (a sync on GPU), as flash-attn's varlen API
    does with ``max_seqlen``; callers that cannot afford it should validate once upstream.
    """
    if cu_seqlens is None:
        return None
    check_tensor(name, cu_seqlens, 1)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}; use .to(torch.int32)")
    if batch != 1:
        raise ValueError(f"varlen ({name} given) needs batch == 1 (documents packed along seq), got batch {batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries [0, ..., seq], got {cu_seqlens.numel()}")
    c = host_ints(cu_seqlens)
    if c[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {c[0]}")
    if c[-1] != seq:
        raise ValueError(f"{name}[-1] must equal the sequence length {seq}, got {c[-1]}")
    if any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"{name} must be strictly increasing (no empty documents), got {list(c)}")
    return cu_seqlens


def varlen_bounds(cu_seqlens, q_offset, k_offset: int, batch: int, seq_q: int, seq_k: int,
                  device: torch.device) -> Optional[tuple[int, ...]]:
    """The host boundaries of a varlen call (None without ``cu_seqlens``) after checking that it
    takes no offsets, equal q / k lengths, and ``cu_seqlens`` on q's device (read once per tensor)."""
    if cu_seqlens is None:
        return None
    if q_offset is not None or k_offset != 0:
        raise ValueError("q_offset/k_offset cannot be combined with cu_seqlens; pass one or the other")
    if seq_q != seq_k:
        raise ValueError(f"varlen (cu_seqlens) needs q and k of equal length, got {seq_q} and {seq_k}")
    check_cu_seqlens(cu_seqlens, batch, seq_q)
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on q's device {device}, got {cu_seqlens.device}")
    return host_ints(cu_seqlens)  # cached per tensor: no sync per layer


def check_int(name: str, value) -> int:
    """``value`` as a Python int (bools rejected); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a Python int, got {value!r}")
    return value


def check_window(window, causal: bool) -> int:
    """A sliding window (Mistral: query ``i`` sees keys ``j`` with ``i - window < j <= i``) as an
    int, 0 for none (``None``). ValueError for a non-int, a window < 1 or a non-causal call."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1 (keys i - window < j <= i), got {window!r}")
    if not causal:
        raise ValueError("window needs causal=True: the sliding window is causal (Mistral-style)")
    return window


def default_sm_scale(sm_scale: Optional[float], head_dim: int) -> float:
    if sm_scale is None:
        return head_dim ** -0.5
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise ValueError(f"sm_scale must be a positive float, got {sm_scale!r}")
    return float(sm_scale)


# ---- host reads and data checks: once per step, not once per layer ------------------------------
def host_ints(t: torch.Tensor) -> tuple[int, ...]:
    """The values of a small integer tensor (e.g. ``cu_seqlens``) as Python ints.

    Read once per tensor and cached on the tensor object (keyed by its version counter, so an
    in-place change is seen): every layer of a step passes the same ``cu_seqlens`` object, so a
    GPU tensor costs one device-to-host sync per step, not one per layer. Tensors built from host
    values can be seeded with :func:`seed_host_ints` and cost none.
    """
    cached = getattr(t, "_seqpar_host_ints", None)
    version = t._version
    if cached is not None and cached[0] == version:
        return cached[1]
    values = tuple(int(x) for x in t.detach().reshape(-1).tolist())
    t._seqpar_host_ints = (version, values)
    return values


def per_tensor_cache(t: torch.Tensor, attr: str) -> dict:
    """A dict kept on ``t`` under ``attr`` for values derived from it (plans, positions), emptied when
    ``t`` changes in place (its version counter). Values must not hold ``t`` itself (no cycle)."""
    cached = getattr(t, attr, None)
    if cached is None or cached[0] != t._version:
        cached = (t._version, {})
        setattr(t, attr, cached)
    return cached[1]


def seed_host_ints(t: torch.Tensor, values) -> torch.Tensor:
    """Record the host values of ``t`` (built from them) so :func:`host_ints` needs no sync; returns ``t``."""
    t._seqpar_host_ints = (t._version, tuple(int(x) for x in values))
    return t


# Active collectors of deferred data checks (innermost last); see deferred_data_checks.
_DEFERRED: list[list] = []


def check_data(bad: torch.Tensor, message: Union[str, Callable[[], str]]) -> None:
    """A data-dependent input check: ``bad`` is a bool tensor, any True is a failure.

    Raises ``ValueError(message)`` now (one host read, a sync on GPU), or, inside
    :func:`deferred_data_checks`, only records the flag on the device: the caller checks every
    recorded flag once (``seqpar.cp.step_checks`` does it once per training step).
    ``message`` may be a callable (only evaluated when raising eagerly; it may read values).
    """
    if _DEFERRED:
        _DEFERRED[-1].append((bad.detach().reshape(-1).any(), message if isinstance(message, str) else None))
        return
    if bool(bad.any()):
        raise ValueError(message if isinstance(message, str) else message())


@contextlib.contextmanager
def deferred_data_checks() -> Iterator[list]:
    """Within the block, :func:`check_data` records ``(flag, message)`` in the yielded list instead of
    reading the flag on the host."""
    found: list = []
    _DEFERRED.append(found)
    try:
        yield found
    finally:
        _DEFERRED.remove(found)


# ---- caches of host-built index tensors (plans) -----------------------------------------------------
class BoundedCache:
    """Least-recently-used cache bounded by bytes, for plans and index tensors that every layer of a
    step shares: ``get_or_build(key, build)`` returns the cached value or builds it. ``size(value)``
    gives a value's bytes (including copies it holds on devices); values past ``max_bytes`` are
    dropped, least recently used first, always keeping the newest. Call :meth:`resize` when a
    cached value grows (e.g. it made a device copy)."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int]) -> None:
        self.max_bytes = int(max_bytes)
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        value = build()
        self._items[key] = value
        self.resize()
        return value

    def resize(self) -> None:
        """Drop least recently used values until the cache holds at most ``max_bytes`` (or one value)."""
        total = sum(self.size(v) for v in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            total -= self.size(old)

    def nbytes(self) -> int:
        return sum(self.size(v) for v in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
