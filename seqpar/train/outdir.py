"""What a run's ``train.out_dir`` holds, read from the file system alone (no megatron-core, no torch).

``checkpoints`` lists the complete ``step_N`` folders and ``held_run`` says why a run without
``--resume`` may not start there: ``--check`` (every launcher's pre-flight, every Slurm job start) asks
before anything starts, so this stays out of ``seqpar.train.checkpoint`` (megatron-core's
``dist_checkpointing``), which re-exports both.
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

STEP_DIR = re.compile(r"^step_(\d+)$")
"""Name of a complete checkpoint folder (``step_N``; temp folders do not match)."""


def checkpoints(ckpt_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoint folders ``step_N`` of ``ckpt_dir``, oldest first (temp folders excluded)."""
    root = pathlib.Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def held_run(out_dir: str | pathlib.Path) -> Optional[str]:
    """Why a run without ``--resume`` may not start in ``out_dir`` (it holds checkpoints of a run), with
    the three ways on; None when it holds none. No side effects: ``--check`` asks it before anything starts."""
    out = pathlib.Path(out_dir)
    found = [str(p) for p in checkpoints(out / "checkpoints")]
    if not found:
        return None
    found += [str(p) for p in (out / "tb").glob("events.out.tfevents.*")] if (out / "tb").is_dir() else []
    return (f"train.out_dir={str(out)!r} already holds a run ({len(found)} checkpoint / tensorboard item(s), "
            f"e.g. {found[-1]}): pass --resume to continue it, pick another train.out_dir, or set "
            f"train.overwrite=true to delete it")


__all__ = ["STEP_DIR", "checkpoints", "held_run"]
