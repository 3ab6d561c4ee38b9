"""The output folder of ``seqpar.export.hf`` and ``seqpar.export.from_hf``: written atomically, and
replaced by ``--force`` only when it holds nothing but an earlier output of the same tool.

Every output gets ``seqpar_output.json`` naming the tool and every file it wrote. ``--force``
replaces an existing folder only when that manifest is there, was written by the same tool, and
lists every file in the folder (an empty folder is replaced too): a folder that holds anything else
(another export, a training run continued from an import, your own files) is refused, naming what
it holds, and left untouched.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Optional

from seqpar.export.reader import ExportError

MANIFEST = "seqpar_output.json"
"""File in every export / import folder: ``{"tool": ..., "files": [relative paths]}``."""


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _foreign(out: pathlib.Path, tool: str) -> Optional[str]:
    """Why ``out`` is not an earlier output of ``tool`` (None when --force may replace it)."""
    if not out.is_dir():
        return "is not a folder"
    files = _files(out)
    if not files:
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        written = set(manifest["files"]) | {MANIFEST}
        owner = manifest["tool"]
    except (OSError, ValueError, KeyError, TypeError):
        shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
        return f"holds {shown} and no {MANIFEST}, so it is not an earlier output of {tool}"
    if owner != tool:
        return f"is an output of {owner}, not of {tool}"
    extra = [f for f in files if f not in written]
    if extra:
        shown = ", ".join(extra[:4]) + (f", ... ({len(extra)} files)" if len(extra) > 4 else "")
        return f"holds files that the earlier {tool} did not write ({shown})"
    return None


def check_out_dir(out: pathlib.Path, *, force: bool, tool: str) -> None:
    """Raise ``ExportError`` unless ``tool`` may write ``out``: it does not exist, or ``force`` and it is
    empty or exactly an earlier output of ``tool``. Nothing is changed."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"output folder {out} exists; pass --force to replace it (only an earlier output of {tool} "
                          f"is replaced)")
    why = _foreign(out, tool)
    if why is not None:
        raise ExportError(f"output folder {out} {why}; --force replaces only an earlier output of {tool}, so "
                          f"nothing was written: choose another folder (or remove this one yourself)")


def install(tmp: pathlib.Path, out: pathlib.Path, tool: str) -> None:
    """Write the manifest of ``tmp`` (every file in it) and move ``tmp`` to ``out``, replacing an
    earlier output (checked by :func:`check_out_dir` first) only once the new one is complete."""
    (tmp / MANIFEST).write_text(json.dumps({"tool": tool, "files": _files(tmp)}, indent=1) + "\n")
    if out.exists():
        old = out.with_name(f".old_{out.name}_{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


__all__ = ["MANIFEST", "check_out_dir", "install"]
