"""The engine interface of the training loop, and the registry of engines by name.

One loop (``seqpar.train.loop``) owns data, metrics, logging, signals, checkpoint cadence and the
resume flow; an *engine* owns the model's parallel wrapping, the forward / backward / optimizer step
and the checkpoint format. The loop and the CLI know engines only through this module:

- :class:`Engine` — build (``Engine.build(cfg, vocab_size)`` after the process groups exist), one
  optimizer step (``train_step(batch, ctx)``), a forward-only validation step (``eval_step(batch)``), save / load of a checkpoint, train mode, close; plus the
  recipe checks an engine makes before any process group (``Engine.check``).
- :class:`Batch` — one step's batch on this DP rank, built by the loop (new per-step inputs such as
  document boundaries are added here, once, for every engine).
- :class:`StepContext` — what the loop wraps around an engine's forward + backward (``cp.step_checks``
  and the run's non-finite guard) and the veto it gets before an update (``accept``).
- :class:`StepResult` — the step's scalars, identical on every rank.
- :data:`ENGINES` / :func:`engine_class` — ``train.engine`` name -> engine class, imported on first use;
  :data:`ENGINE_CHECKS` / :func:`check_engine` — its ``Engine.check`` without importing the engine.

Imports flow one way: this module and the loop never import an engine module; the engines
(``seqpar.train.megatron_engine``, ``seqpar.deepspeed.engine``) import this module and
``seqpar.train.runtime`` (what they share), never the loop or each other.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import pathlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch

from seqpar import cp
from seqpar.data.batch import Batch  # noqa: F401  the batch contract, defined once in seqpar.data


@dataclass
class StepResult:
    """Scalars of one step, identical on every rank (taken over all pipeline stages)."""

    loss: float
    """Cross-entropy averaged over the valid tokens of the whole global batch."""
    aux_loss: float
    """MoH load-balance loss of the model (its layers' terms, times the coefficient, summed over all
    pipeline stages), averaged over DP replicas and micro-batches."""
    tokens: int
    """Valid tokens in the global batch."""
    grad_norm: Optional[float] = 0.0
    """L2 norm of the full gradient before clipping (megatron's get_grad_norm_fp32), 0 without a step;
    None where the engine reports none (DeepSpeed before its first step)."""
    lr: float = 0.0
    """Learning rate of this step."""
    updated: bool = True
    """False when the update was skipped (non-finite loss / grad norm within train.skip_nonfinite_steps)."""
    accuracy: Optional[float] = None
    """Fraction of the global batch's loss-masked tokens whose greedy prediction is the label (the
    ``StepContext.accuracy`` counter's); None when the engine was given none."""
    cp_imbalance: Optional[float] = None
    """Modelled attention work of the step's CP placement, ``max / mean`` over the CP ranks
    (``seqpar.train.runtime.modelled_imbalance``: the model's ``cp.CostModel`` over this rank's
    micro-batches' partitions; 1.0 = balanced); None without CP."""


class StepContext:
    """The loop's part of one optimizer step ``step`` (0-based), handed to ``Engine.train_step``.

    The engine enters :meth:`forward_backward` around the forward and backward of all its
    micro-batches (not the optimizer update), and calls :meth:`accept` with the step's loss and grad
    norm before it applies the update (or, for an engine that cannot hold the update back, after).
    ``monitor``: the run's ``seqpar.train.health.HealthMonitor`` (None: no non-finite checks);
    ``accuracy``: the run's ``seqpar.train.runtime.TokenAccuracy`` on the engine's modules (the engine
    adds ``accuracy.take(loss_mask)`` of each micro-batch to its step statistics; None: not counted)."""

    def __init__(self, step: int, monitor: Any = None, accuracy: Any = None) -> None:
        self.step, self.monitor, self.accuracy = step, monitor, accuracy

    @contextlib.contextmanager
    def forward_backward(self) -> Iterator[None]:
        """The non-finite guard (names the step when a forward / backward fails on NaN / inf) and
        ``cp.step_checks()``: seqpar's CP attention layers agree on their inputs once and read their
        data checks once per step (one all-reduce + one host read at the end), never per layer."""
        guard = self.monitor.guard(self.step) if self.monitor is not None else contextlib.nullcontext()
        with guard, cp.step_checks():
            yield

    def accept(self, loss: float, grad_norm: float) -> bool:
        """True = apply the update; False = skip it (train.skip_nonfinite_steps); raises
        ``NonFiniteError`` past the limit."""
        return True if self.monitor is None else self.monitor.check(self.step, loss, grad_norm)


class Engine(abc.ABC):
    """One rank's training engine for the recipe's model. Subclasses set the class attributes and
    implement the abstract methods; the loop calls them in this order: ``check`` (before any process
    group), ``build``, ``load`` (on resume), ``train``, then per step ``train_step`` and, at the
    checkpoint cadence, ``save``; ``close`` at the end of a run that did not fail."""

    name: ClassVar[str]
    """Registry key, the recipe's ``train.engine``."""
    log_prefix: ClassVar[str] = "[seqpar.train]"
    """Prefix of the engine's console messages."""
    progress_desc: ClassVar[str] = "train"
    """Label of the progress bar."""
    skips_steps: ClassVar[bool] = False
    """Whether a non-finite step can be skipped (``train.skip_nonfinite_steps``); the loop then logs
    ``train/skipped_steps``."""

    @classmethod
    def check(cls, cfg: Any, dp: Optional[int] = None) -> None:
        """Refuse what this engine cannot run, before any process group, naming the field (``ConfigError``
        / ``ValueError``). ``dp``: the data-parallel size when the world is known (the CLI), which
        allows the checks that depend on it. Default: nothing beyond the recipe schema."""

    @classmethod
    @abc.abstractmethod
    def memory_plan(cls, cfg: Any, dp: int) -> dict[str, Any]:
        """What ``--dry-run`` reports for this engine at data-parallel size ``dp``, without a process
        group: ``engine``, ``zero_stage`` / ``zero_ranks`` / ``offload`` (DeepSpeed, else None),
        ``distributed_optimizer`` (Megatron, else None) and ``bytes_per_param`` = {param, grad,
        optimizer, offloaded, total (on the device)} of a rank's shard (``seqpar.train.memory``'s
        closed forms)."""

    @classmethod
    @abc.abstractmethod
    def build(cls, cfg: Any, vocab_size: int) -> "Engine":
        """This rank's model, optimizer and schedule for the current process groups."""

    @property
    def summary_head(self) -> str:
        """First words of the end-of-run summary."""
        return self.log_prefix

    @property
    @abc.abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """This rank's bare model chunk(s) (for hooks: attention timing, non-finite checks)."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the loop puts a step's :class:`Batch`."""

    @abc.abstractmethod
    def train(self, mode: bool = True) -> None:
        """Training (or evaluation) mode of the model."""

    @abc.abstractmethod
    def train_step(self, batch: Batch, ctx: StepContext) -> StepResult:
        """One optimizer step on ``batch``: forward + backward of its micro-batches inside
        ``ctx.forward_backward()``, ``ctx.accept(loss, grad_norm)``, the update and the LR schedule.
        Returns the step's scalars with ``lr`` (the LR of this step), ``grad_norm`` and ``updated``."""

    @abc.abstractmethod
    def eval_step(self, batch: Batch) -> StepResult:
        """Forward only (no gradient, no update, no RNG draw) of this DP rank's ``batch`` through the
        model, pipeline-aware; the loop calls it under ``torch.no_grad()`` and ``cp.step_checks()``
        with the model in eval mode. Returns ``loss`` (cross-entropy over the valid tokens of the whole
        global batch) and ``tokens``, identical on every rank."""

    @abc.abstractmethod
    def save(self, ckpt_dir: pathlib.Path, step: int, *, rng: Any, config: dict[str, Any],
             tokenizer: Any = None) -> pathlib.Path:
        """Write the checkpoint of ``step`` (steps done) under ``ckpt_dir`` atomically (collective), with
        the run's ``seqpar.data.Tokenizer`` files in ``step_N/tokenizer/``; returns its folder."""

    @abc.abstractmethod
    def load(self, path: pathlib.Path, *, config: dict[str, Any]) -> dict[str, Any]:
        """Load the verified checkpoint ``path`` (model, optimizer, LR schedule); ``config``: this run's
        resolved recipe (a model change is refused). Returns ``{"step", "rng", "layout", ...}``;
        ``rng`` is None when the checkpoint was written with another parallel layout."""

    def close(self) -> None:
        """Release the engine's resources at the end of the run (before the process groups go)."""


ENGINES: dict[str, str] = {
    "megatron": "seqpar.train.megatron_engine:MegatronEngine",
    "deepspeed": "seqpar.deepspeed.engine:DeepSpeedEngine",
}
"""``train.engine`` -> ``module:class``; the module is imported on first use (engines sit above this
module in the import order)."""


ENGINE_CHECKS: dict[str, Optional[str]] = {
    "megatron": None,
    "deepspeed": "seqpar.deepspeed.config:check_engine",
}
"""``train.engine`` -> its ``Engine.check`` as ``module:function`` in a module that imports neither
megatron-core nor DeepSpeed, which the engine class's ``check`` calls; None: the engine checks nothing
beyond the recipe schema. ``check_engine`` runs it without importing the engine (~6 s of CPU saved on
``--check``, every launcher's pre-flight and every Slurm job start)."""


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as ``name`` (``train.engine``)."""
    _known(name)
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_engine(cfg: Any, dp: Optional[int] = None) -> None:
    """``engine_class(cfg.train.engine).check(cfg, dp)`` without importing the engine (``ENGINE_CHECKS``)."""
    target = ENGINE_CHECKS[_known(cfg.train.engine)]
    if target is not None:
        module, _, attr = target.partition(":")
        getattr(importlib.import_module(module), attr)(cfg, dp)


def _known(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"train.engine={name!r}: unknown engine; expected one of {sorted(ENGINES)}")
    return name


__all__ = ["Batch", "ENGINES", "ENGINE_CHECKS", "Engine", "StepContext", "StepResult", "check_engine", "engine_class"]
