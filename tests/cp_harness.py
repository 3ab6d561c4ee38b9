"""Run a function on P spawned ranks over gloo; the multi-rank harness for every CP test.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each initialising gloo with a
``file://`` rendezvous in a fresh temp dir (never a fixed port), calls ``fn(rank, world, *args)``
and returns the per-rank results (tensors moved to CPU). A rank that raises makes the call raise
with that rank's traceback; a timeout kills the ranks so a collective bug can never hang the suite.
``fn`` must be a top-level function of an importable module (spawn pickles it by name).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(fn: Callable, rank: int, world: int, tmp: str, args: tuple, backend: str = "gloo") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    path = os.path.join(tmp, f"rank{rank}.pt")
    try:
        if backend == "nccl":  # one GPU per rank (tests/gpu)
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'rdv')}",
                                rank=rank, world_size=world)
        # Connect the full mesh before any rank can fail and tear its end down under a peer.
        dist.barrier()
        try:
            result = ("ok", _to_cpu(fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        result = ("err", traceback.format_exc())
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)


def _collect_errors(tmp: str, world: int, first: int, first_tb: str, grace: float = 3.0) -> str:
    # Peers of a failing rank usually fail too (often just "connection closed"); give them a moment
    # and report every rank's traceback, the first failure first.
    msgs = {first: first_tb}
    end = time.monotonic() + grace
    while time.monotonic() < end and len(msgs) < world:
        for r in range(world):
            f = os.path.join(tmp, f"rank{r}.pt")
            if r not in msgs and os.path.exists(f):
                status, value = torch.load(f, weights_only=False)
                msgs[r] = value if status == "err" else "(finished)"
        time.sleep(0.05)
    return "\n".join(f"rank {r} of {world} failed:\n{tb}" for r, tb in msgs.items() if tb != "(finished)")


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (``backend="nccl"``: one GPU each);
    return results ordered by rank."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seqpar_cp_") as tmp:
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            procs = [ctx.Process(target=_worker, args=(fn, r, world, tmp, args, backend), daemon=True)
                     for r in range(world)]
            for p in procs:
                p.start()
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        error = None
        try:
            while len(results) < world and error is None:
                for r in range(world):
                    f = os.path.join(tmp, f"rank{r}.pt")
                    if r not in results and os.path.exists(f):
                        status, value = torch.load(f, weights_only=False)
                        if status == "err":
                            error = _collect_errors(tmp, world, r, value)
                            break
                        results[r] = value
                if error is None and len(results) < world:
                    dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()
                            and not os.path.exists(os.path.join(tmp, f"rank{r}.pt"))]
                    if dead:
                        error = f"ranks {dead} exited without a result (exit codes " \
                                f"{[procs[r].exitcode for r in dead]})"
                    elif time.monotonic() > deadline:
                        error = f"timed out after {timeout}s; ranks done: {sorted(results)}"
                    else:
                        time.sleep(0.05)
        finally:
            for p in procs:  # only the processes started here
                if p.is_alive() and (error is not None or len(results) < world):
                    p.kill()
                p.join(timeout=10)
        if error is not None:
            raise RuntimeError(error)
        return [results[r] for r in range(world)]
