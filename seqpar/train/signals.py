"""Interrupts, orphaned workers and failed peers of a training run.

What a run does (``install()`` from the CLI, ``stop_requested()`` at every step boundary of the loop):

- **SIGTERM / SIGUSR1 / SIGINT** (Slurm preemption ``#SBATCH --signal=USR1@120``, ``scancel``, Ctrl-C,
  ``kill`` of torchrun, which forwards them) only set a flag. At the next step boundary the ranks
  agree (one MAX all-reduce of a flag over the world, so all stop after the same step even when the
  signal reached them at different times), write a checkpoint, rank 0 writes
  ``<out_dir>/interrupted.json`` and prints that a checkpoint was written, and every rank exits with
  ``EXIT_INTERRUPTED`` (75). A second SIGINT more than ``FORCE_AFTER_S`` after the first exits at once.
- **The torchrun agent dies** (e.g. SIGKILL): workers get ``PR_SET_PDEATHSIG`` and a watchdog thread
  sees the parent pid change; they print why and exit with ``EXIT_AGENT_DIED`` (76) instead of training
  on as orphans.
- **A peer rank or node dies / hangs**: every process group has the recipe's
  ``parallel.distributed_timeout_s``; a collective that fails or times out is reported by ``guard()``
  with the ranks and hosts whose heartbeat (one key per rank in torchrun's store, every
  ``HEARTBEAT_S``) stopped, and the rank exits with ``EXIT_PEER_FAILED`` (77).
- ``resume_mode()``: ``--resume auto`` (and any torchrun restart or Slurm requeue, where
  ``TORCHELASTIC_RESTART_COUNT`` / ``SLURM_RESTART_COUNT`` > 0) resumes from ``latest`` when a
  checkpoint exists and starts fresh otherwise.

``python -m seqpar.train.signals out-dir RECIPE [--set a.b=v ...]`` prints the recipe's
``train.out_dir`` (the Slurm launcher uses it for per-node logs and the requeue decision).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator, Optional

EXIT_INTERRUPTED = 75
"""A signal stopped the run after a checkpoint was written; rerun with ``--resume`` (EX_TEMPFAIL)."""
EXIT_AGENT_DIED = 76
"""The torchrun agent (this worker's parent) died; the worker stopped instead of becoming an orphan."""
EXIT_PEER_FAILED = 77
"""A collective failed or timed out because another rank or node died or hung."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORCE_AFTER_S = 3.0
"""A repeated SIGINT later than this forces an immediate exit (an earlier one is the same interrupt
delivered twice: by the terminal or Slurm to every process, and again by torchrun's forwarding)."""
HEARTBEAT_S = 0.5
"""Heartbeat period of each rank in the rendezvous store (used to name a dead peer)."""
MARKER = "interrupted.json"
"""Written by rank 0 into train.out_dir when a signal stopped the run (step, signal, checkpoint)."""

_PR_SET_PDEATHSIG = 1


def _log(msg: str) -> None:
    print(f"[seqpar.train] rank {os.environ.get('RANK', 0)} ({socket.gethostname()}): {msg}",
          file=sys.stderr, flush=True)


class _State:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self.parent: Optional[int] = None
        self.out_dir: Optional[pathlib.Path] = None
        self.timeout_s = 300.0
        self.stopped: Optional[tuple[int, str]] = None  # (step, checkpoint) once the loop stopped on a signal
        self.monitor: Optional[_Heartbeat] = None
        self.armed = False  # set by the first stop_requested(): before it there is no step to save


_state: Optional[_State] = None


def _handler(signum: int, frame: Any) -> None:
    st = _state
    assert st is not None
    if st.parent is not None and os.getppid() != st.parent:
        _agent_died()
    now = time.monotonic()
    if not st.armed:  # still starting up (or resuming): nothing new to save, stop now
        name = signal.Signals(signum).name
        _log(f"{name} before the first step: nothing to save (the latest checkpoint is unchanged); exiting "
             f"with code {EXIT_INTERRUPTED}")
        raise SystemExit(EXIT_INTERRUPTED)
    if st.signum is None:
        st.signum, st.first_at = signum, now
        _log(f"{signal.Signals(signum).name} received: a checkpoint is written at the next step boundary, "
             f"then the run exits with code {EXIT_INTERRUPTED}")
    elif signum == signal.SIGINT and now - st.first_at > FORCE_AFTER_S:
        _log("second SIGINT: exiting now without a checkpoint")
        raise KeyboardInterrupt


_DIED_ONCE = threading.Lock()


def _agent_died() -> None:
    # the parent-death signal and the watchdog thread can both fire: one message, one exit
    if not _DIED_ONCE.acquire(blocking=False):
        return
    _log(f"the torchrun agent (pid {_state.parent if _state else '?'}) died: exiting with code "
         f"{EXIT_AGENT_DIED} instead of training on as an orphan")
    os._exit(EXIT_AGENT_DIED)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            _agent_died()


def die_with_parent() -> bool:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    worker never outlives the process that started it, even one killed with SIGKILL. False where the
    platform has no prctl (the caller then needs its own watchdog)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def install(cfg: Any) -> None:
    """Signal handlers, parent-death exit (under torchrun) and the recipe's timeout for this process.

    Call once per process before the process group starts (handlers live in the main thread).
    ``cfg`` is the validated recipe (uses ``train.out_dir``, ``parallel.distributed_timeout_s``).
    """
    global _state
    st = _state = _State()
    st.out_dir = pathlib.Path(cfg.train.out_dir)
    st.timeout_s = float(cfg.parallel.distributed_timeout_s)
    if os.environ.get("RANK", "0") == "0":
        clear_marker(st.out_dir)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: exit with the agent
        st.parent = os.getppid()
        die_with_parent()  # not Linux: the watchdog thread alone
        if os.getppid() != st.parent:  # died before prctl took effect
            _agent_died()
        threading.Thread(target=_watch_parent, args=(st.parent,), name="seqpar-agent-watchdog",
                         daemon=True).start()
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)


def pg_timeout(cfg: Any) -> datetime.timedelta:
    """The recipe's process-group timeout (``parallel.distributed_timeout_s``) as a timedelta."""
    return datetime.timedelta(seconds=float(cfg.parallel.distributed_timeout_s))


def init_default_group(cfg: Any) -> None:
    """The default process group from torchrun's environment, with the recipe's timeout (nccl on CUDA,
    else gloo).

    Under torchrun every restart attempt rendezvouses in a fresh ``PrefixStore`` of the agent's store:
    the store outlives the attempt, and gloo would otherwise read the dead attempt's addresses and fail
    with "Connection refused" after ``torchrun --max-restarts`` restarted the workers.
    """
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend, timeout = ("nccl" if cuda else "gloo"), pg_timeout(cfg)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"seqpar/attempt_{attempt}", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def stop_requested() -> bool:
    """True on every rank iff any rank received a stop signal (one MAX all-reduce of an int over the
    world; call it at the same point of every step on every rank). False when ``install()`` was not
    called (library use)."""
    if _state is None:
        return False
    import torch
    import torch.distributed as dist

    _state.armed = True

    flag = int(_state.signum is not None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], dtype=torch.int32, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return bool(flag)


def stopped(step: int, checkpoint_path: Any) -> None:
    """Record that the loop stopped on a signal after writing ``checkpoint_path`` at ``step``; the run
    then exits through ``raise_if_stopped()``."""
    if _state is not None:
        _state.stopped = (step, str(checkpoint_path))


def stop_signal_name() -> str:
    """The signal that stopped the run, as this rank saw it ("a signal on another rank" when only
    another rank received one)."""
    st = _state
    return signal.Signals(st.signum).name if st is not None and st.signum is not None else "a signal on another rank"


def raise_if_stopped() -> None:
    """After the loop has cleaned up: if it stopped on a signal, rank 0 writes the marker and says so,
    then ``SystemExit(EXIT_INTERRUPTED)`` on every rank."""
    st = _state
    if st is None or st.stopped is None:
        return
    import torch.distributed as dist

    step, path = st.stopped
    name = stop_signal_name()
    if not dist.is_initialized() or dist.get_rank() == 0:
        if st.out_dir is not None:
            st.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = st.out_dir / (MARKER + ".tmp")
            tmp.write_text(json.dumps({"step": step, "signal": name, "checkpoint": path, "time": time.time()}))
            os.replace(tmp, st.out_dir / MARKER)
        print(f"[seqpar.train] stopped by {name}: checkpoint written at step {step} ({path}); exiting with "
              f"code {EXIT_INTERRUPTED}. Continue with --resume (or --resume auto).", flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


def clear_marker(out_dir: Any) -> None:
    """Remove a previous run's ``interrupted.json`` (rank 0, at the start of a run)."""
    with contextlib.suppress(FileNotFoundError):
        (pathlib.Path(out_dir) / MARKER).unlink()


def resume_mode(arg: Any, ckpt_dir: Any) -> bool:
    """Whether to resume: ``arg`` is the CLI's ``--resume`` (False/None, True or "latest", or "auto").

    "auto", and any restart (``TORCHELASTIC_RESTART_COUNT`` or ``SLURM_RESTART_COUNT`` > 0), resume iff
    ``<ckpt_dir>/latest`` exists; plain ``--resume`` requires it.
    """
    restarted = any(int(os.environ.get(v, "0") or 0) > 0
                    for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if arg in (True, "latest"):
        return True
    if arg == "auto" or restarted:
        return (pathlib.Path(ckpt_dir) / "latest").exists()
    return False


# ---------------------------------------------------------------------------------------------------
# Naming a failed peer


class _Heartbeat:
    """Each rank bumps ``seqpar/<run>/<restart>/hb/<rank>`` in torchrun's store every HEARTBEAT_S from
    its own client connection; after a collective failed, ranks whose counter stopped are dead."""

    def __init__(self, rank: int, world: int) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.host, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.prefix = (f"seqpar/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        self.store = dist.TCPStore(self.host, self.port, is_master=False,
                                   timeout=datetime.timedelta(seconds=10))
        self.store.set(f"{self.prefix}/host/{rank}", f"{socket.gethostname()} {_my_addr(self.host)}")
        self.hosts: dict[int, str] = {}
        self._stop = threading.Event()
        self.error: Optional[str] = None
        self._thread = threading.Thread(target=self._beat, name="seqpar-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.store.set(f"{self.prefix}/hb/{self.rank}", str(n))
            except Exception as e:  # the store's host is gone; reported by dead_peers()
                self.error = str(e)
                return
            n += 1
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop beating, wait for the thread (at most one store timeout) and drop the store client, so
        that no C++ store thread is still running when the interpreter exits (std::terminate)."""
        self._stop.set()
        self._thread.join(timeout=15)
        if not self._thread.is_alive():
            self.store = None

    def _read(self, store: Any) -> dict[int, Optional[str]]:
        keys = [f"{self.prefix}/hb/{r}" for r in range(self.world)]
        out: dict[int, Optional[str]] = {}
        for r, k in enumerate(keys):
            out[r] = store.get(k).decode() if store.check([k]) else None
            hk = f"{self.prefix}/host/{r}"
            if r not in self.hosts and store.check([hk]):
                self.hosts[r] = store.get(hk).decode()
        return out

    def dead_peers(self) -> tuple[list[int], Optional[str]]:
        """(ranks whose heartbeat stopped, error reaching the store or None); takes ~4 x HEARTBEAT_S."""
        import torch.distributed as dist

        try:
            store = dist.TCPStore(self.host, self.port, is_master=False, timeout=datetime.timedelta(seconds=3))
            a = self._read(store)
            time.sleep(4 * HEARTBEAT_S)
            b = self._read(store)
        except Exception as e:
            return [], f"the rendezvous store at {self.host}:{self.port} is unreachable ({_first_line(e)})"
        return [r for r in range(self.world) if r != self.rank and a[r] == b[r]], None

    def describe(self, ranks: list[int]) -> str:
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(self.hosts.get(r, "unknown host"), []).append(r)
        return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} on {h}"
                         for h, rs in by_host.items())


def _my_addr(master: str) -> str:
    """The local address this host uses to reach ``master``."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(master), 9))  # UDP connect: no packet is sent
            return s.getsockname()[0]
    except OSError:
        return "?"


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def start_heartbeat() -> None:
    """Start this rank's heartbeat (after the default process group exists; torchrun only)."""
    import torch.distributed as dist

    st = _state
    if st is None or st.monitor is not None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if not dist.is_initialized() or dist.get_world_size() == 1 or "MASTER_ADDR" not in os.environ:
        return
    try:
        st.monitor = _Heartbeat(dist.get_rank(), dist.get_world_size())
    except Exception as e:  # naming a dead peer is a diagnostic: never fail the run for it
        _log(f"heartbeat disabled ({_first_line(e)})")


def stop_heartbeat() -> None:
    """Stop and release this rank's heartbeat (before the process group is destroyed at exit)."""
    st = _state
    if st is not None and st.monitor is not None:
        st.monitor.close()
        st.monitor = None


_ADDR = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:(\d+)")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Around the training run: an exception raised by a failed or timed-out collective becomes one
    message naming the dead ranks / hosts, and ``SystemExit(EXIT_PEER_FAILED)``. Other exceptions
    (bugs, recipe errors) pass through unchanged."""
    import torch.distributed as dist

    try:
        yield
    except Exception as e:
        st = _state
        if not dist.is_initialized() or dist.get_world_size() == 1:
            raise
        text = str(e)
        distish = isinstance(e, getattr(dist, "DistError", ())) or bool(
            re.search(r"gloo|nccl|connection|timed out|timeout|closed by peer|broken pipe|reset by peer",
                      text, re.I))
        if not distish:  # a bug or a bad input: its own traceback
            raise
        mon = st.monitor if st else None
        dead, store_err = mon.dead_peers() if mon else ([], None)
        if mon:
            mon.stop()
        if dead:
            who = f"peer failure: {mon.describe(dead)} stopped (heartbeat lost)"
        elif store_err:
            who = f"peer failure: {store_err}, so the host {os.environ.get('MASTER_ADDR')} (rank 0's node) is down"
        else:
            peers = sorted({m.group(1) for m in _ADDR.finditer(text)})
            who = (f"a collective failed or timed out (process-group timeout {st.timeout_s if st else '?'} s)"
                   + (f"; peer address(es) {', '.join(peers)}" if peers else "")
                   + "; every rank's heartbeat is alive, so a rank is hung or the network is partitioned")
        _log(f"{who}. Exiting with code {EXIT_PEER_FAILED}. Cause: {type(e).__name__}: {_first_line(e)}")
        raise SystemExit(EXIT_PEER_FAILED) from None


def _main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "out-dir":
        print("usage: python -m seqpar.train.signals out-dir RECIPE [--set a.b=v ...] [other seqpar-train args]",
              file=sys.stderr)
        return 2
    from seqpar.known_warnings import filter_known_warnings

    filter_known_warnings()  # as the CLI
    from seqpar.train.args import parse_args
    from seqpar.train.config import load_recipe

    args = parse_args(argv[1:])
    try:
        print(load_recipe(args.recipe, args.overrides).train.out_dir)
    except (ValueError, OSError) as e:
        print(f"invalid recipe {args.recipe}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
