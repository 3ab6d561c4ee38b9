"""Documents from local files, the input of preprocessing and tokenizer training.

- ``*.jsonl`` / ``*.json`` (JSON Lines): one document per line, the string under ``json_key``
  (``{"text": "...", "source": "tempest"}``); blank lines are skipped.
- ``*.parquet``: one document per row, column ``json_key`` (through pyarrow, in batches).
- any other file: plain UTF-8 text, the whole file one document.

A line or row without the key, or whose value is not a string, is an error naming the file and line
(row) and the fix; an empty string is a document with no tokens and is counted by the caller.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Iterator, Optional

from seqpar.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DocumentError(ConfigError):
    """A bad input file or record: names the file (and line) and the fix."""


def kind_of(path: str | pathlib.Path) -> str:
    """"jsonl", "parquet" or "text" by the file name's suffix."""
    suffix = pathlib.Path(path).suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def check_files(paths: Iterable[str | pathlib.Path], json_key: str, field: str = "--input") -> list[pathlib.Path]:
    """The paths as ``Path``s; :class:`DocumentError` for a missing file or an empty ``json_key``."""
    out = [pathlib.Path(p) for p in paths]
    if not out:
        raise DocumentError(f"{field}: no input files given")
    for p in out:
        if not p.is_file():
            raise DocumentError(f"{field}: {str(p)!r} is not a file")
    if not json_key and any(kind_of(p) != "text" for p in out):
        raise DocumentError(f"{field}: the JSON key is empty; pass the field that holds each document's text "
                            f"(e.g. --json-key text / data.json_key: text)")
    return out


def _record_text(rec: object, json_key: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise DocumentError(f"{where}: a record must be a JSON object with a {json_key!r} string, got "
                            f"{type(rec).__name__}")
    if json_key not in rec:
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise DocumentError(f"{where}: no key {json_key!r} (keys: {keys}); pass the key that holds the text "
                            f"(--json-key / data.json_key)")
    text = rec[json_key]
    if not isinstance(text, str):
        raise DocumentError(f"{where}: {json_key!r} is a {type(text).__name__}, not a string; pass the key that "
                            f"holds the text (--json-key / data.json_key)")
    return text


def iter_documents(paths: Iterable[str | pathlib.Path], json_key: str = "text") -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every document of ``paths`` in order (``where`` = ``file:line``, ``file:row``
    or ``file``). Raises :class:`DocumentError` on the first bad record."""
    for path in map(pathlib.Path, paths):
        kind = kind_of(path)
        if kind == "jsonl":
            with path.open("r", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{n}"
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DocumentError(f"{where}: not valid JSON ({e.msg}); JSON Lines files hold one JSON "
                                            f"object per line") from None
                    yield where, _record_text(rec, json_key, where)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(str(path))
            if json_key not in pf.schema_arrow.names:
                raise DocumentError(f"{path}: no column {json_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                    f"pass the column that holds the text (--json-key / data.json_key)")
            row = 0
            for batch in pf.iter_batches(columns=[json_key], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    where = f"{path}:row {row}"
                    row += 1
                    if not isinstance(text, str):
                        raise DocumentError(f"{where}: {json_key!r} is {type(text).__name__}, not a string")
                    yield where, text
        else:
            try:
                yield str(path), path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DocumentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it, or give "
                                    f"the corpus as JSON Lines") from None


def stdlib_docstrings(min_chars: int = 300) -> Iterator[tuple[str, str]]:
    """``(name, docstring)`` of the Python standard library's top-level modules and their public classes
    and functions, in sorted order: English prose that needs no download (the demo corpus). Sources are
    parsed (``ast``), never imported."""
    import ast
    import sysconfig

    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [(path.stem, tree)] + [(f"{path.stem}.{n.name}", n) for n in tree.body if isinstance(
            n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
        for name, node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield name, doc


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m seqpar.data.documents --demo-corpus OUT.jsonl``: the demo corpus (standard-library
    docstrings) as JSON Lines, one ``{"text": ..., "source": ...}`` per document."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m seqpar.data.documents",
                                 description="Write the demo corpus (Python standard-library docstrings) as JSON Lines.")
    ap.add_argument("--demo-corpus", required=True, metavar="OUT.jsonl", help="the file to write")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.demo_corpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = chars = 0
    with out.open("w", encoding="utf-8") as f:
        for name, text in stdlib_docstrings():
            f.write(json.dumps({"text": text, "source": name}) + "\n")
            n, chars = n + 1, chars + len(text)
    print(f"[seqpar.data.documents] wrote {out}: {n:,} documents, {chars:,} characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
