"""One training run per (task, model, seed), on the trainer's own engine: the recipe's megatron-core
``GPTModel`` from seqpar's layer specs, built and stepped by the recipe's engine
(``seqpar.train.engine.engine_class(train.engine)``, megatron by default: megatron DDP, megatron's
optimizer and LR schedule, its forward/backward schedule, token-weighted loss, MoH aux loss, grad
clipping), on a world of one rank per run.

Runs are spread over ``workers`` spawned processes (one torch thread each by default on CPU), each
run with its own gloo (CPU) / NCCL (CUDA) world of one; a run's result depends only on its (task, model,
seed), not on the worker or the order. A run that fails is reported with its error and the others
still run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from seqpar.quality import tasks as T
from seqpar.quality.config import Scale


@dataclass(frozen=True)
class Job:
    """One run: train ``model`` on ``task`` with ``seed``, then evaluate."""

    task: str
    model: str
    seed: int
    recipe: dict
    """The ``RunConfig`` tree (``seqpar.train.config.from_dict``) of the run."""
    task_cfg: Any
    text_file: Optional[str] = None


def recipe(scale: Scale, task_name: str, model_fields: dict[str, Any], seed: int, vocab: int, out_dir: str,
           cuda: bool) -> dict[str, Any]:
    """The run's recipe: the model's shape and knobs, one rank, the task's batch / length / steps,
    AdamW with warmup and cosine decay to lr / 10."""
    task = scale.task(task_name)
    lr = task.lr
    # the trainer reads the model's position range and vocabulary from `data`; the batches come from
    # the quality task (seqpar.quality.tasks.train_data), so the MQAR fields only have to be valid
    data: dict[str, Any] = {"dataset": "text", "seq_len": T.max_seq_len(task_name, task), "global_batch": task.batch,
                            "vocab_size": vocab}
    if task_name != "text":
        pairs, queries, _ = max(task.settings, key=lambda s: s[2]) if task_name == "mqar" else (1, 1, 0)
        data.update(dataset="mqar", mqar_pairs=pairs, mqar_queries=queries)
    return {
        "model": {"preset": "tiny-dense", "dtype": "bf16" if cuda else "fp32", **model_fields},
        # on CPU the torch kernels: "auto" would pick the Triton interpreter where TRITON_INTERPRET=1
        # (a correctness tool, orders of magnitude slower)
        "parallel": {"backend": "auto" if cuda else "torch"},
        "data": data,
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": min(scale.warmup_steps, task.steps // 4),
                  "weight_decay": scale.weight_decay},
        "train": {"steps": task.steps, "seed": seed, "progress": False, "out_dir": out_dir},
    }


# --------------------------------------------------------------------------------------------------
# the worker


_RDV_DIR: Optional[str] = None  # the worker's rendezvous folder (set by _init_worker)
_RUNS = 0  # runs started in this worker (each gets its own rendezvous file)


def _init_worker(threads: int, rdv_dir: str) -> None:
    global _RDV_DIR
    from seqpar.known_warnings import filter_known_warnings
    from seqpar.train.signals import die_with_parent

    die_with_parent()  # a harness killed by pid (even SIGKILL) takes its workers with it
    filter_known_warnings()
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    _RDV_DIR = rdv_dir


def run_job(job: Job) -> dict[str, Any]:
    """Train and evaluate one run in this worker, in its own world of one rank (gloo on CPU, NCCL on
    CUDA: ``seqpar.megatron.init_parallel``, torn down after the run); never raises: a failure is a
    result with ``status: failed`` and the error."""
    global _RUNS
    from seqpar.data import Batch
    from seqpar.megatron import destroy_parallel, init_parallel
    from seqpar.train.config import from_dict
    from seqpar.train.engine import StepContext, engine_class

    t_cpu, t_wall = time.process_time(), time.perf_counter()
    res: dict[str, Any] = {"task": job.task, "model": job.model, "seed": job.seed, "status": "ok", "error": None,
                           "metrics": {}, "params": None, "losses": []}
    try:
        cfg = from_dict(job.recipe)
        torch.manual_seed(job.seed)
        _RUNS += 1
        rdv = pathlib.Path(_RDV_DIR or tempfile.gettempdir()) / f"rdv_{os.getpid()}_{_RUNS}"
        init_parallel(1, 1, 1, seed=job.seed, init_method=f"file://{rdv}", rank=0, world_size=1)
        try:
            engine = engine_class(cfg.train.engine).build(cfg, cfg.data.vocab_size)
            res["params"] = sum(p.numel() for c in engine.modules for p in c.parameters())
            device = engine.device
            text_file = pathlib.Path(job.text_file) if job.text_file else None
            data = T.train_data(job.task, job.task_cfg, job.seed, text_file)
            engine.train()
            every = max(1, cfg.train.steps // 20)
            for step in range(cfg.train.steps):
                b = data.batch(step, cfg.data.global_batch)
                b = Batch(*(t.to(device) for t in (b.tokens, b.labels, b.loss_mask, b.position_ids)))
                r = engine.train_step(b, StepContext(step))
                if not (r.loss == r.loss):  # NaN: stop here, the metrics would be meaningless
                    raise FloatingPointError(f"loss is NaN at step {step}")
                if step % every == 0 or step + 1 == cfg.train.steps:
                    res["losses"].append([step, r.loss])
            res["metrics"] = T.evaluate(job.task, job.task_cfg, engine.model, text_file)
        finally:
            destroy_parallel()
    except Exception as e:  # noqa: BLE001 - reported in the table, the other runs go on
        res["status"] = "failed"
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=8)
    res["cpu_s"] = time.process_time() - t_cpu
    res["wall_s"] = time.perf_counter() - t_wall
    return res


def run_jobs(jobs: Iterable[Job], workers: int, threads: int,
             on_result: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``workers`` spawned processes (``threads`` torch threads each, CPU); returns the
    results in the order of ``jobs``."""
    jobs = list(jobs)
    ctx = mp.get_context("spawn")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # SIGTERM (kill PID) becomes SystemExit here, so the pool's exit terminates the workers and the
    # rendezvous folder is removed (the workers also die with this process: _init_worker)
    main_thread = threading.current_thread() is threading.main_thread()  # handlers live in the main thread
    prev = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        with tempfile.TemporaryDirectory(prefix="seqpar_quality_") as rdv, \
                ctx.Pool(workers, initializer=_init_worker, initargs=(threads, rdv), maxtasksperchild=None) as pool:
            results: dict[int, dict[str, Any]] = {}
            for i, res in pool.imap_unordered(_indexed, list(enumerate(jobs))):
                results[i] = res
                if on_result is not None:
                    on_result(res)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return [results[i] for i in range(len(jobs))]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _indexed(item: tuple[int, Job]) -> tuple[int, dict[str, Any]]:
    return item[0], run_job(item[1])


__all__ = ["Job", "recipe", "run_job", "run_jobs"]
