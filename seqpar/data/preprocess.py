"""``python -m seqpar.data.preprocess``: documents -> megatron-core ``.bin`` / ``.idx`` (an
``IndexedDataset``, readable by megatron-core and by Megatron-LM's tools).

::

    python -m seqpar.data.preprocess --input corpus.jsonl [more files] --json-key text \\
        --tokenizer TOKENIZER --output-prefix data/corpus [--workers N] [--seq-len 2048]

Inputs (``seqpar.data.documents``): JSON Lines (``.jsonl`` / ``.json``, the string under
``--json-key``), parquet (column ``--json-key``), or plain text files (one document each).
``TOKENIZER`` is a sentencepiece model file or a Hugging Face tokenizer folder (``tokenizer.json``).

Each document becomes one sequence of ``tokenizer.encode(text) + [eod]`` written through
megatron-core's ``IndexedDatasetBuilder`` in the smallest dtype megatron picks for the vocabulary
(``DType.optimal_dtype``: uint16 below 65,500 ids, else int32). A tokenizer without an EOS / EOD token is
refused (documents could not be told apart after packing). Empty documents (``""``) have no tokens and are
skipped, and counted in the summary; documents longer than ``--seq-len`` are kept whole (training
splits them over consecutive windows) and counted. The two files are written under temporary names and
renamed at the end, so an interrupted run leaves no half-written dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Iterable, Iterator, Optional

import numpy as np

from seqpar.data.documents import DocumentError, check_files, iter_documents
from seqpar.data.tokenizer import Tokenizer, TokenizerError
from seqpar.errors import ConfigError


@dataclasses.dataclass
class Summary:
    """What one preprocessing run wrote."""

    prefix: str
    documents: int = 0
    """Documents written (one sequence each)."""
    empty: int = 0
    """Empty documents skipped."""
    tokens: int = 0
    """Tokens written, one EOD per document included."""
    bytes_in: int = 0
    """UTF-8 bytes of the documents' text."""
    bytes_out: int = 0
    """Size of the ``.bin`` file."""
    seconds: float = 0.0
    longest: int = 0
    """Tokens of the longest document (EOD included)."""
    seq_len: Optional[int] = None
    over_seq_len: int = 0
    """Documents longer than ``seq_len + 1`` tokens (split over several training windows)."""
    dtype: str = ""

    def line(self) -> str:
        mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        s = (f"[seqpar.data.preprocess] {self.documents:,} documents, {self.tokens:,} tokens (one EOD each), "
             f"{mb(self.bytes_in)} text -> {mb(self.bytes_out)} {self.prefix}.bin ({self.dtype}) + .idx in "
             f"{self.seconds:.1f} s ({rate:,.0f} tokens/s); longest document {self.longest:,} tokens")
        if self.empty:
            s += f"; {self.empty:,} empty documents skipped"
        if self.seq_len is not None:
            s += (f"; {self.over_seq_len:,} documents longer than seq_len={self.seq_len} (split over consecutive "
                  f"windows in training, none dropped)")
        return s


_TOKENIZER: Optional[Tokenizer] = None  # the worker processes' tokenizer (inherited through fork)


def _encode(text: str) -> list[int]:
    return _TOKENIZER.encode(text) if text else []


def _encoded(texts: Iterable[str], workers: int) -> Iterator[list[int]]:
    """Token ids of each text in order, in ``workers`` forked processes (1: in this one)."""
    if workers <= 1:
        yield from map(_encode, texts)
        return
    import multiprocessing as mp

    # fork: the workers inherit the loaded tokenizer (spawn would re-import megatron-core in each)
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode, texts, chunksize=32)


def write_indexed(documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, prefix: str | pathlib.Path, *,
                  workers: int = 1, seq_len: Optional[int] = None, progress: bool = True) -> Summary:
    """Encode ``(where, text)`` documents with ``tokenizer`` into ``prefix.bin`` / ``prefix.idx``
    (written as temp files, renamed at the end). Returns the :class:`Summary`."""
    global _TOKENIZER
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    eod = tokenizer.require_eod("--tokenizer")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = str(prefix)
    pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    summary = Summary(prefix=prefix, seq_len=seq_len, dtype=np.dtype(dtype).name)
    t0 = time.perf_counter()
    stats = {"bytes": 0, "empty": 0}

    def texts() -> Iterator[str]:
        for _, text in documents:
            stats["bytes"] += len(text.encode("utf-8"))
            stats["empty"] += not text
            yield text

    _TOKENIZER = tokenizer
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="preprocess", unit=" docs", mininterval=2.0, file=sys.stderr, dynamic_ncols=True)
    try:
        for ids in _encoded(texts(), workers):
            if bar is not None:
                bar.update(1)
            if not ids:
                continue
            ids.append(eod)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            summary.documents += 1
            summary.tokens += len(ids)
            summary.longest = max(summary.longest, len(ids))
            summary.over_seq_len += seq_len is not None and len(ids) > seq_len + 1
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        _TOKENIZER = None
        if bar is not None:
            bar.close()
        for f in (tmp + ".bin", tmp + ".idx"):
            if os.path.exists(f):
                os.remove(f)
    summary.empty, summary.bytes_in = stats["empty"], stats["bytes"]
    summary.bytes_out = os.path.getsize(prefix + ".bin")
    summary.seconds = time.perf_counter() - t0
    return summary


def preprocess(inputs: list[str], tokenizer: str, output_prefix: str, *, json_key: str = "text", workers: int = 1,
               seq_len: Optional[int] = None, force: bool = False, progress: bool = True,
               cache_dir: Optional[str] = None) -> Summary:
    """The command line's work (see the module docstring); raises :class:`ConfigError` subclasses for
    bad input, before anything is written."""
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"--seq-len={seq_len} must be >= 1")
    files = check_files(inputs, json_key)
    existing = [p for p in (output_prefix + ".bin", output_prefix + ".idx") if os.path.exists(p)]
    if existing and not force:
        raise ConfigError(f"--output-prefix: {existing[0]} exists; pass --force to replace it, or another prefix")
    tok = Tokenizer.load(tokenizer, cache_dir, field="--tokenizer")
    tok.require_eod("--tokenizer")
    return write_indexed(iter_documents(files, json_key), tok, output_prefix, workers=workers, seq_len=seq_len,
                         progress=progress)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.data.preprocess",
                                 description="Tokenize documents into megatron-core .bin/.idx (IndexedDataset).")
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSON Lines (.jsonl/.json), parquet, or text files (one document per text file)")
    ap.add_argument("--json-key", default="text", help="the field (column) holding each document's text")
    ap.add_argument("--tokenizer", required=True,
                    help="sentencepiece .model file, or Hugging Face tokenizer folder (tokenizer.json)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="count the documents longer than this training sequence length in the summary")
    ap.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin / PREFIX.idx")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--cache-dir", default=None, help="where the tokenizer's private copy goes "
                                                      "(default $SEQPAR_CACHE or ~/.cache/seqpar)")
    args = ap.parse_args(argv)
    from seqpar.known_warnings import filter_known_warnings

    filter_known_warnings()  # megatron-core's import-time notices (the tokenizers import it)
    try:
        summary = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                             workers=args.workers, seq_len=args.seq_len, force=args.force, progress=not args.quiet,
                             cache_dir=args.cache_dir)
    except (ConfigError, DocumentError, TokenizerError, OSError) as e:
        print(f"seqpar.data.preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
