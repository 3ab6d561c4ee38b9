"""``python -m seqpar.train.torchrun [torchrun args]``: torchrun (``torch.distributed.run``, in this
process, so signals sent to it reach its agent as before) that ends a failed run with one line and
the workers' exit code instead of torchrun's own traceback (what launchers/torchrun.sh runs).

A worker that fails has already said why (seqpar-train's one-line errors, or the worker's own
traceback for a crash); torchrun then raises ``ChildFailedError`` (or ``SignalException ... got
signal: 2`` after Ctrl-C) and Python prints its traceback and a failure table, and the agent logs
``failed (exitcode: N)`` / ``Sending process N closing signal``. Here all of that goes to
``<train.out_dir>/logs/torchrun_<time>_<host>.log`` and the terminal gets one line naming the
rank, its exit code and that file. Exit code: the first failed worker's (75 after an interrupt
that wrote a checkpoint, 2 for a bad recipe or resume, 128 + N for a worker killed by signal N);
after a signal to torchrun itself, 75 when the workers checkpointed, else 128 + the signal.
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Optional

PREFIX = "seqpar torchrun"

# the agent's log records that only repeat a worker failure the worker reported itself
_NOISE = ("failed (exitcode:", "closing signal", "Received", "got signal")


class _Noise(logging.Filter):
    """Keeps the agent's failure chatter off the terminal (it is written to the log file instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name.startswith("torch.distributed.elastic") and any(n in msg for n in _NOISE):
            self.records.append(f"{record.levelname} {record.name}: {msg}")
            return False
        return True


def _out_dir(script_args: list[str]) -> Optional[pathlib.Path]:
    """``train.out_dir`` of the recipe torchrun launched (``-m seqpar.train RECIPE [--set ...]``)."""
    try:
        from seqpar.train.args import parse_args
        from seqpar.train.config import load_recipe

        args = parse_args(script_args)
        return pathlib.Path(load_recipe(args.recipe, args.overrides).train.out_dir)
    except (SystemExit, Exception):  # an unreadable recipe: fall back to the temp folder
        return None


def _write_log(script_args: list[str], text: str) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"torchrun_{stamp}_{socket.gethostname()}_{os.getpid()}.log"
    out = _out_dir(script_args)
    for path in ([out / "logs" / name] if out is not None else []) + [pathlib.Path(tempfile.gettempdir()) / name]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    raise OSError("cannot write the torchrun log")


def _code(exitcode: int) -> int:
    return exitcode if exitcode > 0 else 128 - exitcode if exitcode < 0 else 1


def _interrupted_since(script_args: list[str], start: float) -> bool:
    from seqpar.train.signals import MARKER

    out = _out_dir(script_args)
    marker = None if out is None else out / MARKER
    return marker is not None and marker.exists() and marker.stat().st_mtime >= start


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from seqpar.known_warnings import filter_known_warnings

    filter_known_warnings()  # _out_dir imports megatron-core (through the recipe schema) after a failure
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    script_args = list(args.training_script_args)
    noise = _Noise()
    # torch's loggers ("torch", "torch.distributed", ...) carry their own stderr handlers
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n == "torch" or n.startswith("torch.")]
    for handler in {h for lg in loggers for h in lg.handlers}:
        handler.addFilter(noise)
    start = time.time()
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = _code(failure.exitcode)
        what = (f"rank {rank} on {socket.gethostname()} exited with code {failure.exitcode}"
                + (f" ({failure.signal_name()})" if failure.exitcode < 0 else " (its message is above)"))
        report = traceback.format_exc()
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        code = 75 if _interrupted_since(script_args, start) else 128 + sig.value
        what = (f"stopped by {sig.name}" + ("; the workers wrote a checkpoint (above): continue with --resume"
                                            if code == 75 else ""))
        report = traceback.format_exc()
    report += "\n" + "\n".join(noise.records) + "\n"
    try:
        log = f"torchrun's report: {_write_log(script_args, report)}"
    except OSError:
        log = "torchrun's report could not be written"
    print(f"{PREFIX}: {what}; exit {code} ({log})", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
