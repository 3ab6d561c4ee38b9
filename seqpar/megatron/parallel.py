"""Process groups for a megatron-core run: torch.distributed + ``parallel_state`` (TP x CP x DP x PP).

megatron-core is imported by the functions that make or tear down its groups, so that
``has_process_group`` / ``raise_if_any_rank_failed`` (the data preparation of ``--check``) stay light."""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from seqpar.megatron.cpu_compat import enable_cpu_compat, model_parallel_seed


def init_parallel(tp: int = 1, cp: int = 1, pp: int = 1, *, vp: int | None = None, seed: int = 1234,
                  init_method: str | None = None, rank: int | None = None, world_size: int | None = None,
                  timeout_s: float | None = None) -> None:
    """Start torch.distributed (gloo on CPU, nccl on CUDA) if needed, then megatron's TP/CP/DP/PP groups
    (megatron's rank order tp-cp-ep-dp-pp: a DP x CP group spans the replicas of one TP x PP shard),
    then seed the RNG tracker. On a CPU-only machine this also calls ``enable_cpu_compat()``.

    ``vp`` is the number of virtual pipeline stages per rank (interleaved schedule), None for one.
    ``init_method``/``rank``/``world_size`` default to torchrun's environment (``env://``).
    ``timeout_s`` (the recipe's ``parallel.distributed_timeout_s``) is the timeout of the default group
    (when started here) and of megatron's groups; None keeps torch's / megatron's 30 min defaults.
    """
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if init_method is None and "MASTER_ADDR" not in os.environ:
            raise ValueError("no rendezvous: launch with torchrun or pass init_method='file:///tmp/...'")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method or "env://",
                                rank=rank, world_size=world_size,
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * cp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel x context_parallel x "
                         f"pipeline_parallel = {tp * cp * pp}")
    if not cuda:
        enable_cpu_compat()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}))
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def has_process_group() -> bool:
    """Whether this process has a default process group (torch.distributed initialised)."""
    return dist.is_available() and dist.is_initialized()


def raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Collective over the default group (when there is one): every rank passes the outcome of the same
    local step (None = it worked); if any rank failed, *every* rank raises — the failing rank its own
    error, the others the lowest failing rank's message with ``(raised on rank R)`` on its first line
    (a ``ConfigError`` when that error was one, so the CLI's one-line exit 2 holds on every rank; else
    ``RuntimeError``).

    Without it a rank whose step failed (e.g. rank 0 training the tokenizer, a file missing on one
    node) exits while its peers wait in their next collective until ``parallel.distributed_timeout_s``
    (or until torchrun's agent kills them; ``srun`` without torchrun has no agent). One int all-reduce
    when every rank succeeded (``seqpar.cp.Comm.agree``), the message broadcast only on failure."""
    from seqpar.cp.comm import Comm
    from seqpar.errors import ConfigError

    if not has_process_group():
        if error is not None:
            raise error
        return
    # the kind rides as the message's first character (agree carries one string)
    mine = None if error is None else ("C" if isinstance(error, ConfigError) else "R") + (str(error) or repr(error))
    failed = Comm().agree(mine)
    if failed is None:
        return
    if error is not None:
        raise error
    rank, msg = failed
    first, _, rest = msg[1:].partition("\n")
    raise (ConfigError if msg[0] == "C" else RuntimeError)(f"{first} (raised on rank {rank})" + (rest and "\n" + rest))


@contextlib.contextmanager
def solo_group() -> Iterator[None]:
    """A one-process gloo group of this process alone (file rendezvous in a temp folder), destroyed on
    exit: megatron-core's dataset builder, which asks for the rank and runs barriers, then builds
    everything itself with instant barriers (``seqpar.data.sources`` builds its caches this way, before
    the run's process groups exist)."""
    if has_process_group():
        raise RuntimeError("solo_group() is for a process without process groups")
    with tempfile.TemporaryDirectory(prefix="seqpar_solo_") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
