"""Numerical health of a run: a non-finite loss or gradient norm stops it (or skips the step, up
to a limit), naming the step, the rank and where the values went non-finite.

Like megatron's ``check_for_nan_in_loss_and_grad``, the per-step check is always on and costs
nothing extra: it looks at the loss and the global grad norm the loop already has as floats (both
identical on every rank, so every rank takes the same decision and no collective can hang).

- ``train.skip_nonfinite_steps = N``: up to N such steps are skipped (gradients dropped, no
  optimizer update, the step counter and the data position advance, ``train/skipped_steps`` in
  tensorboard); the N+1-th stops the run. 0 (default): the first one stops it.
- Stopping raises ``NonFiniteError`` on every rank; the CLI prints it once and exits 3. No
  checkpoint of non-finite weights is ever written (``checkpoint.save`` refuses as well).
- ``train.debug_nonfinite``: forward hooks on every decoder layer and every attention / MLP module
  record ``isfinite(output).all()`` as a device tensor (no host sync); only when a step fails are
  they read, in call order, to name the first module (and attention kind) whose output went
  non-finite, and the first parameter whose gradient did.
- A forward that raises (e.g. a MoH router whose gates became NaN) is reported the same way when
  the weights or the recorded outputs are non-finite: ``guard(step)`` turns it into
  ``NonFiniteError`` naming the step instead of the kernel's input check. The MoH routers' gates
  are recorded always (one isfinite per MoH layer), so this needs no debug mode.

Loop contract (two calls): ``with monitor.guard(step): <forward + backward>``, then
``monitor.check(step, loss, grad_norm)`` before the optimizer update; False = skip this update.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training produced NaN / inf. ``step`` is 1-based (the step that failed), ``rank`` the global rank."""

    def __init__(self, message: str, step: int, rank: int) -> None:
        super().__init__(message)
        self.step, self.rank = step, rank


def _kind_of(module: torch.nn.Module) -> Optional[str]:
    from seqpar.megatron.attention import (LightningSelfAttention, MoHCoreAttention, MoHHiddenCoreAttention,
                                           MoHSelfAttention, S2CoreAttention, SoftmaxCoreAttention)

    for cls, kind in ((SoftmaxCoreAttention, "softmax attention"), (S2CoreAttention, "s2 attention"),
                      (MoHCoreAttention, "moh attention"), (MoHHiddenCoreAttention, "moh attention"),
                      (MoHSelfAttention, "moh self-attention"), (LightningSelfAttention, "lightning attention")):
        if isinstance(module, cls):
            return kind
    name = type(module).__name__
    if name == "MLP":
        return "mlp"
    if name == "TransformerLayer":
        return "layer"
    if name in ("LanguageModelEmbedding", "ColumnParallelLinear") or "Embedding" in name:
        return None
    return None


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


class HealthMonitor:
    """Per-run numerical checks (see the module docstring). ``models``: the model chunk(s)."""

    def __init__(self, models: Any, *, skip_limit: int = 0, debug: bool = False) -> None:
        self.models = list(models) if isinstance(models, (list, tuple)) else [models]
        self.skip_limit = skip_limit
        self.skipped = 0
        self.debug = debug
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._records: list[tuple[str, str, torch.Tensor]] = []
        self._handles = []
        for m in self.models:
            for name, mod in m.named_modules():
                if type(mod).__name__ == "MoHRouter":
                    # always on: a NaN gate would otherwise surface as the MoH kernel's "gates must be
                    # >= 0" input check; one isfinite over [tokens, heads] gates per MoH layer
                    self._handles.append(mod.register_forward_hook(self._hook(name, "moh router gates")))
                elif debug:
                    kind = _kind_of(mod)
                    if kind is not None or name.endswith("embedding") or name == "output_layer":
                        self._handles.append(mod.register_forward_hook(self._hook(name, kind or "embedding/output")))

    @classmethod
    def from_config(cls, cfg: Any, models: Any) -> "HealthMonitor":
        return cls(models, skip_limit=cfg.train.skip_nonfinite_steps, debug=cfg.train.debug_nonfinite)

    def _hook(self, name: str, kind: str):
        def hook(mod: torch.nn.Module, inputs: Any, out: Any) -> None:
            t = getattr(out, "gates", None)
            t = t if isinstance(t, torch.Tensor) else _first_tensor(out)
            if t is not None and t.is_floating_point():
                self._records.append((name, kind, torch.isfinite(t.detach()).all()))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---------------------------------------------------------------------------------------------
    def _params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for i, m in enumerate(self.models):
            for n, p in m.named_parameters():
                yield (n if len(self.models) == 1 else f"chunk{i}.{n}"), p

    def where(self) -> str:
        """Where this rank's values are non-finite: the first module output (debug mode), the first
        non-finite weight, the first non-finite gradient. Read only after a failure (host syncs)."""
        parts = []
        bad_out = next(((n, k) for n, k, ok in self._records if not bool(ok)), None)
        if bad_out is not None:
            parts.append(f"first non-finite output: {bad_out[0]} ({bad_out[1]})")
        elif self.debug and self._records:
            parts.append("every layer's forward output was finite")
        w = next((n for n, p in self._params() if not torch.isfinite(p.detach()).all()), None)
        if w is not None:
            parts.append(f"first non-finite weight: {w}")
        g = next((n for n, p in self._params() if getattr(p, "grad", None) is not None
                  and not torch.isfinite(p.grad.detach()).all()), None)
        if g is None:  # megatron DDP keeps gradients in main_grad
            g = next((n for n, p in self._params() if getattr(p, "main_grad", None) is not None
                      and not torch.isfinite(p.main_grad.detach()).all()), None)
        if g is not None:
            parts.append(f"first non-finite gradient: {g}")
        if not self.debug:
            parts.append("set train.debug_nonfinite=true to name the first layer whose output went non-finite")
        return "; ".join(parts)

    def nonfinite_weights(self) -> bool:
        return any(not torch.isfinite(p.detach()).all() for _, p in self._params())

    @contextlib.contextmanager
    def guard(self, step: int) -> Iterator[None]:
        """Around the forward + backward of 0-based ``step``: an exception raised while the weights or
        the recorded outputs are non-finite becomes a NonFiniteError naming the step."""
        self._records.clear()
        try:
            yield
        except NonFiniteError:
            raise
        except Exception as e:
            if self.nonfinite_weights() or any(not bool(ok) for _, _, ok in self._records):
                raise NonFiniteError(f"step {step + 1}: non-finite values on rank {self.rank} made the forward / "
                                     f"backward fail ({type(e).__name__}: {str(e).splitlines()[0]}); {self.where()}",
                                     step + 1, self.rank) from e
            raise

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """After forward + backward (+ grad-norm) of 0-based ``step``: True = apply the update,
        False = skip it (within train.skip_nonfinite_steps); raises NonFiniteError otherwise."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        what = f"loss={loss}, grad norm={grad_norm}"
        if self.skipped < self.skip_limit:
            self.skipped += 1
            if self.rank == 0:
                print(f"[seqpar.train] WARNING: step {step + 1}: {what}; update skipped ({self.skipped} of "
                      f"train.skip_nonfinite_steps={self.skip_limit}); {self.where()}", flush=True)
            return False
        limit = (f" after {self.skipped} skipped step(s) (train.skip_nonfinite_steps={self.skip_limit})"
                 if self.skip_limit else " (train.skip_nonfinite_steps=0)")
        raise NonFiniteError(f"step {step + 1}: non-finite {what} on rank {self.rank}{limit}; stopping without "
                             f"saving; {self.where()}. Lower optim.lr or check the data; the newest checkpoint "
                             f"is the last finite one", step + 1, self.rank)


__all__ = ["HealthMonitor", "NonFiniteError"]
