"""The one training loop, over any engine (``seqpar.train.engine``): the process groups, the data
(``build_data``; each step's batch is a function of (step, seed)), the loop over optimizer steps with
the run's non-finite checks and ``cp.step_checks()`` around every step's forward + backward
(``StepContext``), attention timing, tensorboard scalars, a tqdm bar and the end-of-run summary on
rank 0 (``Logger``), stop signals (``seqpar.train.signals``), the checkpoint cadence and the resume
flow (the newest intact checkpoint, RNG states). The engine (``train.engine``: megatron-core's in
``seqpar.train.megatron_engine``, DeepSpeed's in ``seqpar.deepspeed.engine``) is picked by name
through the registry of ``seqpar.train.engine`` and owns the model wrapping, the step and the
checkpoint format.

Entry points: ``train`` (the loop), ``build_data``; ``build_model`` and ``model_config`` are
re-exported from ``seqpar.train.runtime``.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as tp_random

from seqpar import cp
from seqpar.errors import ConfigError
from seqpar.megatron import init_parallel
from seqpar.train import checkpoint, health, signals
from seqpar.train.config import RunConfig
from seqpar.train.engine import Batch, Engine, StepContext, StepResult, engine_class
from seqpar.train.perf import Throughput
from seqpar.train.runtime import TokenAccuracy
from seqpar.train.runtime import build_model, model_config  # noqa: F401  re-exported (their former home)


def build_data(cfg: RunConfig):
    """The run's ``seqpar.data.DataSources`` (``batch`` = the training stream; ``valid`` / ``test``
    splits; ``tokenizer``, pinned in every checkpoint) and the model's vocabulary size. Every rank
    calls it; the data report goes to rank 0's stdout."""
    from seqpar.data import build_sources

    data = build_sources(cfg)
    if dist.get_rank() == 0:
        print("\n".join(f"[seqpar.data] {line}" for line in data.report), flush=True)
    return data, data.vocab_size


class AttentionTimer:
    """Forward wall time per attention kind (hooks on the seqpar attention modules; on CUDA each
    measurement synchronises, so it is off unless train.time_attention is set), and its spread over
    the CP ranks (:meth:`cp_spread`: how well the CP placement balances the measured work)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from seqpar.megatron.attention import (LightningSelfAttention, MoHCoreAttention, S2CoreAttention,
                                               SoftmaxCoreAttention)

        kinds = {SoftmaxCoreAttention: "softmax", S2CoreAttention: "s2", MoHCoreAttention: "moh",
                 LightningSelfAttention: "lightning"}
        self.totals: dict[str, float] = {}
        self._start: dict[int, float] = {}
        for mod in model.modules():
            kind = next((k for cls, k in kinds.items() if isinstance(mod, cls)), None)
            if kind is not None:
                mod.register_forward_pre_hook(self._pre)
                mod.register_forward_hook(lambda m, i, o, kind=kind: self._post(m, kind))

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, mod: torch.nn.Module, inputs: Any) -> None:
        self._sync()
        self._start[id(mod)] = time.perf_counter()

    def _post(self, mod: torch.nn.Module, kind: str) -> None:
        self._sync()
        self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - self._start.pop(id(mod))

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out

    @staticmethod
    def cp_spread(totals: dict[str, float], device: torch.device) -> dict[str, float]:
        """This rank's attention time (``totals``, seconds per kind) against the other CP ranks': one
        all-gather of a float over the CP group (every CP rank must call it; ``{}`` without CP).
        Returns ``attention_fwd_ms_max`` / ``attention_fwd_ms_mean`` over the CP ranks and their ratio
        ``attention_imbalance`` (1.0 = every rank spent the same time)."""
        if parallel_state.get_context_parallel_world_size() == 1:
            return {}
        group = parallel_state.get_context_parallel_group()
        mine = torch.tensor([1e3 * sum(totals.values())], dtype=torch.float64, device=device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        ms = torch.cat(every).tolist()
        mean = sum(ms) / len(ms)
        return {"attention_fwd_ms_max": max(ms), "attention_fwd_ms_mean": mean,
                "attention_imbalance": max(ms) / mean if mean else 1.0}


def worst_over_dp(scalars: dict[str, Optional[float]], device: torch.device) -> dict[str, Optional[float]]:
    """The CP balance scalars of this DP replica (``cp/*``: ``modelled_imbalance`` and the measured
    ``attention_fwd_ms_max`` / ``_mean`` / ``attention_imbalance``) over every DP replica: one
    all-gather of four floats over the DP group (every DP rank must call it; unchanged without DP).
    Each replica places its own documents, and the step waits for the slowest: the maxima and the
    imbalances are the worst replica's, ``attention_fwd_ms_mean`` the mean over replicas. A None
    (not measured here) stays None."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return dict(scalars)
    keys = ("modelled_imbalance", "attention_fwd_ms_max", "attention_fwd_ms_mean", "attention_imbalance")
    mine = torch.tensor([math.nan if scalars.get(k) is None else float(scalars[k]) for k in keys],
                        dtype=torch.float64, device=device)
    group = parallel_state.get_data_parallel_group()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    cols = torch.stack(every).t().tolist()  # [key][replica]
    out = dict(scalars)
    for k, vals in zip(keys, cols):
        if k in scalars and scalars[k] is not None:
            out[k] = sum(vals) / len(vals) if k == "attention_fwd_ms_mean" else max(vals)
    return out


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "tracker": tp_random.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["cpu"])
    tp_random.get_cuda_rng_tracker().set_states(s["tracker"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state(s["cuda"])


def _tensorboard_cmd() -> str:
    """``tensorboard`` next to this interpreter (the venv's) when it is there, else the bare name."""
    exe = pathlib.Path(sys.executable).parent / "tensorboard"
    return str(exe) if exe.exists() else "tensorboard"


def _batch(data: Any, step: int, cfg: RunConfig, device: torch.device) -> Batch:
    """This DP rank's ``[global_batch / DP, seq]`` share of step ``step`` on ``device`` (a
    ``seqpar.data.Batch``: tokens, labels, loss mask, position ids; it also unpacks as the first three).
    Its document boundaries go to the engine (document masking); with ``data.document_mask`` false
    every row is one document. ``data``: a source with ``batch(step, global_batch, dp_rank, dp)``."""
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    batch = data.batch(step, cfg.data.global_batch, dp_rank, dp).to(device)
    return batch if cfg.data.document_mask else batch.whole_rows()


def evaluate(engine: Engine, valid: Any, cfg: RunConfig) -> StepResult:
    """Validation: the first ``train.eval_iters`` batches of the ``valid`` split (each
    ``data.global_batch`` sequences, this DP rank's rows, document-masked like training), forward only
    with the model in eval mode, no gradient and no RNG draw (the training stream, the parameters and
    resume are untouched). Returns the token-weighted loss over all of them and their valid tokens,
    identical on every rank."""
    loss_sum, tokens = 0.0, 0
    engine.train(False)
    try:
        for i in range(cfg.train.eval_iters):
            with torch.no_grad(), cp.step_checks():
                res = engine.eval_step(_batch(valid, i, cfg, engine.device))
            loss_sum += res.loss * res.tokens
            tokens += res.tokens
    finally:
        engine.train(True)
    return StepResult(loss=loss_sum / max(tokens, 1), aux_loss=0.0, tokens=tokens)


def _eval_due(cfg: RunConfig, step: int) -> bool:
    """Validation after optimizer step ``step`` (0-based): every ``train.eval_interval`` steps and after
    the run's last step (a function of the step alone: a resumed run validates where the uninterrupted
    one did)."""
    n = cfg.train.eval_interval
    return bool(n) and ((step + 1) % n == 0 or step + 1 == cfg.train.steps)


class Logger:
    """tensorboard scalars, the tqdm bar and the end-of-run summary, on global rank 0 (every rank
    holds the step's scalars), for every engine (``desc``: the bar's label, ``head``: the summary's
    first words)."""

    def __init__(self, cfg: RunConfig, out: pathlib.Path, start: int, *, desc: str = "train",
                 head: str = "[seqpar.train]", perf: Optional[Throughput] = None,
                 device: Optional[torch.device] = None) -> None:
        self.cfg, self.writer, self.bar, self.head, self.perf = cfg, None, None, head, perf
        self.device = torch.device("cpu") if device is None else device  # the CP gather's tensors live there
        self.valid: list[tuple[int, float]] = []  # (step, validation loss) of this run
        if dist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter
            # scalars of step s are logged at s + 1, so the checkpoint's own last point (start) is kept
            self.writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)
            if cfg.train.progress:
                from tqdm import tqdm
                self.bar = tqdm(total=cfg.train.steps, initial=start, desc=desc, dynamic_ncols=True)

    def log(self, step: int, res: StepResult, dt: float, timer: Optional["AttentionTimer"],
            skipped: Optional[int] = 0, perf: Optional[dict[str, float]] = None) -> None:
        """Scalars of ``step`` every ``train.log_every`` steps; a ``None`` (``res.grad_norm`` when the
        engine reports none, ``skipped`` where steps are never skipped) is not logged. ``perf``: the
        step's ``perf/*`` scalars (``seqpar.train.perf.Throughput.step``), also on the progress line.
        Under CP: ``cp/modelled_imbalance`` (``res.cp_imbalance``) and, with ``timer``, the measured
        ``cp/attention_*`` spread over the CP ranks (:meth:`AttentionTimer.cp_spread`), both the worst
        DP replica's (:func:`worst_over_dp`); collectives: every rank calls ``log`` for every step."""
        perf = perf or {}
        due = (step + 1) % self.cfg.train.log_every == 0
        times = timer.pop() if timer is not None and due else {}
        # every CP rank joins the measured spread's gather (a logged step, with train.time_attention)
        spread = AttentionTimer.cp_spread(times, self.device) if timer is not None and due else {}
        # ... and every DP rank the worst replica's (each places its own documents)
        cp_scalars = (worst_over_dp({"modelled_imbalance": res.cp_imbalance, **spread}, self.device)
                      if due and (res.cp_imbalance is not None or spread) else {})
        if self.writer is not None and due:
            for k, v in perf.items():
                self.writer.add_scalar(f"perf/{k}", v, step + 1)
            for k, v in {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "aux_loss": res.aux_loss,
                         "accuracy": res.accuracy, "tokens_per_s": res.tokens / dt, "skipped_steps": skipped}.items():
                if v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step + 1)
            for kind, sec in times.items():
                self.writer.add_scalar(f"attention_fwd_ms/{kind}", 1e3 * sec, step + 1)
            for k, v in cp_scalars.items():
                if v is not None:
                    self.writer.add_scalar(f"cp/{k}", v, step + 1)
        if self.bar is not None:
            self.bar.update(1)
            acc = {} if res.accuracy is None else {"acc": f"{res.accuracy:.3f}"}
            if perf:
                acc["tok/s/gpu"] = f"{perf['tokens_per_s_per_gpu']:.3g}"
                acc["TFLOP/s"] = f"{perf['tflops_per_gpu']:.3g}"
                if "mfu" in perf:
                    acc["mfu"] = f"{100 * perf['mfu']:.1f}%"
            self.bar.set_postfix(loss=f"{res.loss:.3f}", **acc, aux=f"{res.aux_loss:.3g}", lr=f"{res.lr:.2e}")

    def log_valid(self, step: int, res: StepResult) -> None:
        """``valid/loss`` and ``valid/ppl`` after optimizer step ``step`` (0-based; logged at ``step + 1``,
        as the training scalars), on the progress line and in the summary."""
        self.valid.append((step + 1, res.loss))
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", res.loss, step + 1)
            self.writer.add_scalar("valid/ppl", _ppl(res.loss), step + 1)
        if self.bar is not None:
            self.bar.write(f"{self.head} step {step + 1}: valid loss {res.loss:.4f}, ppl {_ppl(res.loss):.2f} "
                           f"({res.tokens} tokens)")

    def close(self, start: int, done: int, losses: list[float], ckpt_dir: pathlib.Path, out: pathlib.Path, *,
              stopped: str = "") -> None:
        """The end-of-run summary: steps ``start`` -> ``done`` (the last step run) of ``train.steps``,
        why the run ended early (``stopped``, e.g. "stopped by SIGINT"), the loss trend, the checkpoint
        and what to run next."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is None:
            return
        self.writer.close()
        w = max(1, min(10, len(losses) // 4))  # mean of the first / last few steps: the trend, not noise
        trend = (f"loss {sum(losses[:w]) / w:.4f} (first {w} steps) -> {sum(losses[-w:]) / w:.4f} (last {w})"
                 if losses else "no steps run")
        steps = self.cfg.train.steps
        why = (f" ({stopped} after step {done}; continue with --resume)" if stopped
               else "" if done == steps else f" (this run ended early, after step {done})")
        valid = (f"  validation:  loss {self.valid[-1][1]:.4f}, ppl {_ppl(self.valid[-1][1]):.2f} "
                 f"(step {self.valid[-1][0]})\n" if self.valid else "")
        perf = f"  throughput:  {self.perf.summary()}\n" if self.perf is not None else ""
        print(f"{self.head} steps {start}->{done} of {steps}{why}, {trend}\n{valid}{perf}"
              f"  checkpoint:  {checkpoint.latest(ckpt_dir)}\n"
              f"  export (HF): {sys.executable} -m seqpar.export.hf {out} {out / 'hf'}\n"
              f"  tensorboard: {_tensorboard_cmd()} --logdir {out / 'tb'}", flush=True)


def startup_summary(cfg: RunConfig, engine: Engine, vocab_size: int) -> str:
    """The model, its parameter count and the parallel layout, for the start-up log: the total is the
    closed form of ``seqpar.train.memory`` (what ``--dry-run`` reports, tested equal to the built shards),
    this rank's count is read from its modules (ZeRO-3: the full size of its partitioned parameters)."""
    from seqpar.train.memory import closed_form_params

    p, full = cfg.model.shape, cfg.model.layers
    total = closed_form_params(p, full, vocab_size, 1, first=True, last=True,
                               moh_num_shared_heads=cfg.model.moh_num_shared_heads)
    here = sum(int(getattr(t, "ds_numel", t.numel())) for m in engine.modules for t in m.parameters())
    par = cfg.parallel
    tp, cp, pp = par.tensor_parallel, par.context_parallel, par.pipeline_parallel
    world = dist.get_world_size()
    zero = f" ZeRO-{cfg.deepspeed.zero_stage}" if cfg.train.engine == "deepspeed" else ""
    return (f"model {cfg.model.preset}, layers {full} ({p.num_layers}), hidden {p.hidden_size}, heads "
            f"{p.num_attention_heads} / kv {p.num_query_groups}, ffn {p.ffn_hidden_size}, vocab {vocab_size}, "
            f"{cfg.model.dtype}: {total:,} parameters ({total / 1e6:.2f} M)\n"
            f"  layout TP={tp} x CP={cp} x PP={pp} x DP={world // (tp * cp * pp)} = {world} rank(s), engine "
            f"{cfg.train.engine}{zero}; rank 0 holds {here:,} parameters")


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # past e^80 the number says nothing more


def _resume(engine: Engine, ckpt_dir: pathlib.Path, cfg: RunConfig, tokenizer: Any = None) -> int:
    """Load the newest intact checkpoint under ``ckpt_dir`` (manifest-verified, recipe and tokenizer
    compared) into the engine; returns its step."""
    # `latest` if intact, else (train.on_corrupt_checkpoint=fallback) the newest intact older checkpoint,
    # with a warning naming the corrupt file
    path = checkpoint.resumable(ckpt_dir, cfg.train.on_corrupt_checkpoint)
    checkpoint.check_tokenizer(path, tokenizer)  # the run's tokenizer files = the checkpoint's
    state = engine.load(path, config=cfg.to_dict())  # refuses a model change / finished run
    if state["rng"] is not None:
        _set_rng_state(state["rng"])
    elif dist.get_rank() == 0:
        print(f"{engine.log_prefix} {path} was written with parallel layout {state['layout']}; "
              f"RNG states not restored (they are per rank)", flush=True)
    return state["step"]


def train(cfg: RunConfig, *, resume: bool = False, stop_after: Optional[int] = None) -> list[float]:
    """Run the recipe on its engine (``train.engine``); returns the per-step losses of this run
    (identical on every rank).

    ``resume`` continues from ``<out_dir>/checkpoints/latest``. ``stop_after`` ends (with a
    checkpoint) after that many steps of this run, e.g. to test resume.
    """
    engine_cls = engine_class(cfg.train.engine)
    engine_cls.check(cfg)  # refused combinations fail before any process group is made
    world = dist.get_world_size() if dist.is_initialized() else None
    if world is not None:
        cfg.check_world(world)
    par = cfg.parallel
    init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed,
                  timeout_s=par.distributed_timeout_s)
    try:
        losses = _train(engine_cls, cfg, resume, stop_after)
    finally:
        parallel_state.destroy_model_parallel()
    signals.raise_if_stopped()  # SystemExit(signals.EXIT_INTERRUPTED) after a signal stopped the loop
    return losses


def _train(engine_cls: type[Engine], cfg: RunConfig, resume: bool, stop_after: Optional[int]) -> list[float]:
    data, vocab = build_data(cfg)
    if cfg.train.eval_interval and data.valid is None:  # a split the recipe asked for came out empty
        raise ConfigError(f"train.eval_interval={cfg.train.eval_interval}: the data has no validation split "
                          f"(see the data report above); give valid a larger share in data.split or set "
                          f"train.eval_interval=0")
    engine = engine_cls.build(cfg, vocab)
    out = pathlib.Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    checkpoint.prepare_out_dir(out, resume=resume, overwrite=cfg.train.overwrite)  # h16: no silent mixing of runs
    start = _resume(engine, ckpt_dir, cfg, data.tokenizer) if resume else 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    if dist.get_rank() == 0:
        print(f"{engine.log_prefix} {startup_summary(cfg, engine, vocab)}", flush=True)
    device = engine.device
    perf = Throughput(cfg, vocab, device) if dist.get_rank() == 0 else None  # rank 0 logs
    logger = Logger(cfg, out, start, desc=engine.progress_desc, head=engine.summary_head, perf=perf, device=device)
    timer = AttentionTimer(engine.modules[0]) if cfg.train.time_attention else None
    # h16: NaN/inf stop or skip (an engine that cannot hold an update back refuses skipping in its check)
    monitor = health.HealthMonitor.from_config(cfg, engine.modules)
    accuracy = TokenAccuracy(engine.modules)  # train/accuracy (MQAR: recall over the answers)
    losses = []
    stopped = ""
    engine.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = _batch(data, step, cfg, device)
        res = engine.train_step(batch, StepContext(step, monitor, accuracy))
        dt = time.perf_counter() - t0
        losses.append(res.loss)
        logger.log(step, res, dt, timer, monitor.skipped if engine.skips_steps else None,
                   perf.step(batch, dt) if perf is not None else None)  # host only, after the timed step
        if _eval_due(cfg, step):
            logger.log_valid(step, evaluate(engine, data.valid, cfg))
        stop = signals.stop_requested()  # a SIGTERM/SIGUSR1/SIGINT on any rank: save now, then exit (all ranks)
        last = step + 1 == end or stop
        saved = None
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            if logger.writer is not None:  # h16: the scalars up to a checkpoint are on disk before it is `latest`
                logger.writer.flush()
            saved = engine.save(ckpt_dir, step + 1, rng=_rng_state(), config=cfg.to_dict(), tokenizer=data.tokenizer)
        if stop:
            signals.stopped(step + 1, saved)
            stopped = f"stopped by {signals.stop_signal_name()}"
            break
    logger.close(start, start + len(losses), losses, ckpt_dir, out, stopped=stopped)
    monitor.close()
    engine.close()
    return losses
