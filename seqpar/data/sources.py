"""The run's data sources: for every (step, seed, DP rank) a :class:`~seqpar.data.batch.Batch`, the
validation / test splits, and the tokenizer the checkpoints pin.

``data.dataset``:

- ``indexed``: megatron-core ``.bin`` / ``.idx`` prefixes (``python -m seqpar.data.preprocess``) in a
  blend (``data.blend`` in Megatron's ``--data-path`` form + ``data.split``, or per-split
  ``data.train_blend`` / ``valid_blend`` / ``test_blend``), built by megatron-core's
  ``BlendedMegatronDatasetBuilder`` into ``GPTDataset`` s (memory-mapped; ``reset_position_ids`` gives the
  document boundaries) and ``BlendedDataset`` s.
- ``hf``: local JSON Lines / parquet files read by Hugging Face ``datasets`` (no download), tokenized once
  into a ``.bin`` / ``.idx`` in the cache, then exactly the ``indexed`` path (one source, ``data.split``).
- ``text``: today's demo corpus (local text files or the standard library, one document per file,
  packed in memory); ``mqar``: the synthetic recall task (one document per sequence).

**Exact resume.** The batch of step ``s`` is rows ``s * global_batch ... + global_batch - 1`` of the
training stream, a function of (step, seed) only: never of ``train.steps``. The stream is a chain of
*blocks*; block ``k`` is one megatron build of ``E`` samples (``E`` = one epoch of the train split(s):
the sum over the blend's prefixes of their train windows) with seed ``train.seed`` for block 0 and a
derived seed for the others. Raising ``train.steps`` on resume only adds blocks; the blend and the split
are fixed fields of a checkpoint (``seqpar.train.checkpoint.compare_configs``).

**Caches, built once, never raced, never under a collective timeout.** megatron-core builds a
dataset's index caches (document / sample / shuffle ``.npy``) on rank 0 while the others wait in a
barrier that the process group's timeout bounds. Here every cache (the trained tokenizer, an ``hf``
conversion, each block's megatron indices) is built by :func:`prepare` *before* any process group
(the CLI calls it): under an exclusive file lock on ``<cache>/.lock`` (``fcntl.lockf``: works across
nodes on a shared file system that supports POSIX locks; with node-local caches each node builds its
own), into a temporary folder that is renamed into place only when complete, so a reader never sees a
partial cache, a crash leaves none, and two builders can never clash even where locks are
unsupported. :func:`build_sources` (after the process groups exist) then finds every cache in place and
megatron's builder only loads them (its barriers are instant). Called after the process groups with a
cache missing (an API caller who skipped ``prepare``), it builds the missing megatron caches in a
child process without process groups, under the same lock, while this rank waits on the lock — in no
collective, so no timeout can fire; a failure on one rank before megatron's collective load is raised on
every rank (``raise_if_any_rank_failed``). Cached ``.npy`` files are checked to hold plain numbers before
megatron loads them (it loads with ``allow_pickle=True``; an object array would run code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import torch

from seqpar.data.batch import Batch
from seqpar.data.inputs import SPLITS, blends_of, check_inputs
from seqpar.data.tokenizer import DEFAULT_CACHE, Tokenizer, trained_tokenizer
from seqpar.errors import ConfigError

_LOCK_HELD_ENV = "SEQPAR_DATA_LOCK_HELD"  # a child building for a parent that holds the cache lock


class UnsafeCacheError(ConfigError):
    """A cached index file holds Python objects (loading it would run code)."""


# ---------------------------------------------------------------------------------------------------
# cache folder: lock, atomic publish


def cache_root(data: Any) -> pathlib.Path:
    """``data.cache_dir`` or ``$SEQPAR_CACHE`` / ``~/.cache/seqpar``."""
    return pathlib.Path(data.cache_dir or DEFAULT_CACHE)


@contextlib.contextmanager
def cache_lock(root: pathlib.Path) -> Iterator[None]:
    """Exclusive POSIX lock on ``root/.lock`` (blocks, without a timeout, while another process builds).
    A file system without locks: a warning, and builds rely on atomic publishing alone."""
    if os.environ.get(_LOCK_HELD_ENV) == str(root):
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)
        except OSError as e:
            warnings.warn(f"data.cache_dir={str(root)!r}: the file system refuses locks ({e.strerror}); caches are "
                          f"still published atomically, but several ranks may build the same one", stacklevel=2)
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename the complete folder ``tmp`` to ``final`` (atomic); if ``final`` appeared meanwhile, drop ``tmp``."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _stamp(path: str) -> list:
    """What a cache key records of an input file: absolute path, size, modification time (a changed
    file gets a new cache entry; contents are not hashed, they may be terabytes)."""
    st = os.stat(path)
    return [str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _check_npy(folder: pathlib.Path) -> None:
    """Every ``.npy`` in ``folder`` holds a plain numeric array (no pickled objects)."""
    from numpy.lib import format as npformat

    for f in sorted(folder.glob("*.npy")):
        with open(f, "rb") as fh:
            try:
                major, _ = npformat.read_magic(fh)
                read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
                dtype = read(fh)[2]
            except Exception as e:  # noqa: BLE001 - truncated / not an npy file
                raise UnsafeCacheError(f"{f}: not a valid .npy index ({e}); delete {folder} to rebuild it") from None
        if dtype.hasobject:
            raise UnsafeCacheError(f"{f} holds Python objects, which loading would unpickle (run code); a seqpar / "
                                   f"megatron index is plain integers: delete {folder} to rebuild it")


# ---------------------------------------------------------------------------------------------------
# megatron GPTDataset blocks


class _TokenizerView:
    """What megatron's ``GPTDatasetConfig`` reads from a tokenizer: the EOD (document boundaries), the
    vocabulary (dtype checks) and an identity for its cache descriptions. No pad id: megatron then
    pads with -1, which never equals a real token (a pad that collides with EOS would mask EOS labels)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.eod = tok.require_eod()
        self.vocab_size = tok.vocab_size
        self.unique_identifiers = {"class": "seqpar.data.Tokenizer", "sha256": tok.fingerprint}

    @property
    def pad(self) -> int:
        raise AttributeError("no pad token: megatron pads with -1")


@dataclasses.dataclass
class SplitStats:
    """One split of one prefix, read from its ``.idx`` before anything is built."""

    prefix: str
    documents: int
    tokens: int
    samples: int
    """Windows of ``seq_len + 1`` tokens in one epoch (megatron's count; the last partial one dropped)."""
    longer: int
    """Documents longer than ``seq_len + 1`` tokens (split over consecutive windows)."""


def _split_stats(prefixes: list[str], ranges: list[Optional[tuple[float, float]]], seq_len: int
                 ) -> list[list[Optional[SplitStats]]]:
    """``[split][prefix]`` statistics for megatron's split matrix ``ranges`` (``[0, 1)`` per split for
    per-split blends), with megatron's own rounding of document ranges."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out: list[list[Optional[SplitStats]]] = [[] for _ in SPLITS]
    for prefix in prefixes:
        ds = IndexedDataset(prefix, mmap=True)  # kept alive while its memory-mapped lengths are read
        lengths = ds.sequence_lengths
        n = lengths.shape[0]
        for i, r in enumerate(ranges):
            if r is None:
                out[i].append(None)
                continue
            beg, end = int(round(r[0] * float(n))), int(round(r[1] * float(n)))
            part = lengths[beg:end]
            tokens = int(part.sum())
            out[i].append(SplitStats(prefix, end - beg, tokens, max(0, (tokens - 1) // seq_len),
                                     int((part > seq_len + 1).sum())))
    return out


class IndexedPlan:
    """The megatron builds one run reads: per split, the blend and its one-epoch size; the blocks of
    the training stream (see the module docstring)."""

    def __init__(self, data: Any, seed: int, tokenizer: Tokenizer, blends: dict[str, Any], split: Optional[str],
                 root: pathlib.Path) -> None:
        from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                            parse_and_normalize_split)

        self.seq_len, self.seed, self.root = data.seq_len, seed, root
        self.view = _TokenizerView(tokenizer)
        self.fields = blends
        per_split = "data.blend" not in blends
        if per_split:
            self.blend = None
            self.blend_per_split = [blends[f"data.{s}_blend"] for s in SPLITS]
            self.split = None
            self.stats = []
            for i, s in enumerate(SPLITS):
                b = self.blend_per_split[i]
                ranges = [None] * 3
                ranges[i] = (0.0, 1.0)
                self.stats.append(_split_stats(b[0], ranges, self.seq_len)[i] if b else None)
        else:
            self.blend = blends["data.blend"]
            if len(self.blend[0]) == 1:
                self.blend = (self.blend[0], None)  # one source: a plain GPTDataset, no blending
            self.blend_per_split = None
            self.split = split
            matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
            stats = _split_stats(self.blend[0], matrix, self.seq_len)
            self.stats = [None if matrix[i] is None else stats[i] for i in range(3)]
        for i, s in enumerate(SPLITS):
            for st in self.stats[i] or []:
                if st.samples < 1:
                    where = ("data.blend" if not per_split else f"data.{s}_blend")
                    share = (f" with data.split={split!r}" if not per_split else "")
                    fix = ("give the train split more documents or lower data.seq_len" if s == "train" else
                           f"give the {s} split a larger share or 0 (no {s} split), e.g. data.split='98,2,0'"
                           if not per_split else f"add documents or drop data.{s}_blend")
                    raise ConfigError(f"{where}: the {s} split of {st.prefix}{share} has {st.documents} documents, "
                                      f"{st.tokens} tokens: not one window of data.seq_len + 1 = {self.seq_len + 1} "
                                      f"tokens; {fix}")
        self.samples = [sum(st.samples for st in s) if s else 0 for s in self.stats]

    def _config(self, seed: int, path: pathlib.Path):
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

        return GPTDatasetConfig(random_seed=seed, sequence_length=self.seq_len, blend=self.blend,
                                blend_per_split=self.blend_per_split, split=self.split, path_to_cache=str(path),
                                tokenizer=self.view, reset_position_ids=True, reset_attention_mask=False,
                                eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)

    def block_seed(self, block: int) -> int:
        return self.seed if block == 0 else (self.seed + 1_000_003 * block) % 2 ** 32

    def blocks_for(self, num_samples: int) -> int:
        """Blocks the first ``num_samples`` training samples span."""
        return max(1, -(-num_samples // self.samples[0]))

    def block_dir(self, block: int) -> pathlib.Path:
        """``<cache>/index/<key>``: the key hashes everything the block's content depends on."""
        from megatron.core import package_info

        prefixes = sorted({p for b in ([self.blend] if self.blend else self.blend_per_split) if b for p in b[0]})
        desc = {"v": 1, "megatron": package_info.__version__,
                "files": [_stamp(p + s) for p in prefixes for s in (".bin", ".idx")],
                "blend": self.blend, "blend_per_split": self.blend_per_split, "split": self.split,
                "seq_len": self.seq_len, "seed": self.block_seed(block), "sizes": self.samples,
                "tokenizer": self.view.unique_identifiers, "eod": self.view.eod}
        key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / "index" / key

    def _build(self, block: int, path: pathlib.Path) -> list:
        """megatron's builder for one block (train, valid, test datasets or None)."""
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset

        sizes = list(self.samples)
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                             self._config(self.block_seed(block), path)).build()

    def build_missing(self, blocks: int) -> None:
        """Build the caches of blocks ``0 .. blocks-1`` that are not in place, each into a temp folder,
        then renamed. No process group may exist (megatron's builder is collective then); megatron's
        builder runs in a private one-process gloo group (its BlendedDataset asks for the rank)."""
        from seqpar.megatron.parallel import solo_group

        with solo_group():
            for b in range(blocks):
                final = self.block_dir(b)
                if final.is_dir():
                    continue
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp_{final.name}_", dir=final.parent))
                try:
                    self._build(b, tmp)
                    publish(tmp, final)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise

    def missing(self, blocks: int) -> bool:
        return any(not self.block_dir(b).is_dir() for b in range(blocks))

    def load(self, blocks: int) -> list[list]:
        """Every block's datasets from the caches in place (megatron's builder; collective when process
        groups exist, instant because every cache hits)."""
        out = []
        for b in range(blocks):
            path = self.block_dir(b)
            _check_npy(path)
            out.append(self._build(b, path))
        return out


# ---------------------------------------------------------------------------------------------------
# sources


class GPTSource:
    """Samples of megatron datasets as batches: training stream = blocks chained (row ``n`` of the
    stream is sample ``n % E`` of block ``n // E``), a validation / test split = one dataset cycled."""

    def __init__(self, datasets: list, block: int, split: str) -> None:
        self.datasets, self.block, self.split = datasets, block, split

    @property
    def num_samples(self) -> int:
        """Samples before the stream repeats (validation / test: the split's windows)."""
        return self.block if self.split == "train" else len(self.datasets[0])

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        if self.split == "train":
            return self.datasets[n // self.block][n % self.block]
        return self.datasets[0][n % len(self.datasets[0])]

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1) -> Batch:
        """Rows ``[rank::ranks]`` of the ``global_batch`` rows of ``step``."""
        return Batch.stack([self.sample(step * global_batch + i) for i in range(rank, global_batch, ranks)])


@dataclasses.dataclass
class DataSources:
    """The run's data: ``train`` (``batch(step, global_batch, dp_rank, dp)``), the ``valid`` / ``test``
    splits (None where the recipe has none), the tokenizer (None for MQAR) and the model's vocabulary.
    ``batch`` is the training stream's (the loop calls it)."""

    train: Any
    valid: Optional[Any]
    test: Optional[Any]
    tokenizer: Optional[Tokenizer]
    vocab_size: int
    report: list[str] = dataclasses.field(default_factory=list)
    """Lines describing the data (sources, tokens, epochs, long documents), printed at start on rank 0."""

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1) -> Batch:
        return self.train.batch(step, global_batch, rank, ranks)


def _tokenizer(d: Any, root: pathlib.Path) -> Tokenizer:
    if d.tokenizer == "train":
        with cache_lock(root):  # one process trains, the others load it
            return trained_tokenizer(d.vocab_size, d.text_files, d.max_bytes, root)
    return Tokenizer.load(d.tokenizer, root)


def _hf_prefix(d: Any, tok: Tokenizer, root: pathlib.Path) -> pathlib.Path:
    key = hashlib.sha256(json.dumps({"v": 1, "files": [_stamp(f) for f in d.files], "key": d.json_key,
                                     "tokenizer": tok.fingerprint},
                                    sort_keys=True).encode()).hexdigest()[:24]
    return root / "hf" / key / "data"


def _hf_documents(files: list[str], json_key: str, cache: pathlib.Path) -> Iterator[tuple[str, str]]:
    """Documents of local JSON Lines / parquet files read by Hugging Face ``datasets`` (offline)."""
    from seqpar.data.documents import DocumentError, kind_of

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.dataset='hf' reads the files with Hugging Face datasets: install seqpar[export], or "
                          "preprocess them (python -m seqpar.data.preprocess) and use data.dataset='indexed'") from None

    datasets.disable_progress_bars()
    for kind in ("jsonl", "parquet"):
        group = [str(f) for f in files if kind_of(f) == kind]
        if not group:
            continue
        ds = datasets.load_dataset("json" if kind == "jsonl" else "parquet", data_files=group, split="train",
                                   cache_dir=str(cache))
        if json_key not in ds.column_names:
            raise DocumentError(f"data.files {group}: no field {json_key!r} (fields: {', '.join(ds.column_names)}); "
                                f"set data.json_key to the field that holds the text")
        row = 0
        for chunk in ds.select_columns([json_key]).iter(batch_size=1024):
            for text in chunk[json_key]:
                if not isinstance(text, str):
                    raise DocumentError(f"data.files {group}: row {row} has {json_key!r} = {type(text).__name__}, "
                                        f"not a string")
                yield f"row {row}", text
                row += 1


def _indexed_plan(cfg: Any, tok: Tokenizer, root: pathlib.Path, build_hf: bool) -> IndexedPlan:
    d = cfg.data
    if d.dataset == "hf":
        prefix = _hf_prefix(d, tok, root)
        if build_hf and not prefix.parent.is_dir():
            from seqpar.data.preprocess import write_indexed

            with cache_lock(root):
                if not prefix.parent.is_dir():
                    prefix.parent.parent.mkdir(parents=True, exist_ok=True)
                    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp_{prefix.parent.name}_", dir=prefix.parent.parent))
                    try:
                        s = write_indexed(_hf_documents(d.files, d.json_key, root / "hf_datasets"), tok, tmp / "data",
                                          seq_len=d.seq_len, progress=False)
                        if s.documents == 0:
                            raise ConfigError(f"data.files: no non-empty documents under {d.json_key!r}")
                        (tmp / "summary.txt").write_text(s.line() + "\n")
                        publish(tmp, prefix.parent)
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
        blends = {"data.blend": ([str(prefix)], None)}
    else:
        blends = blends_of(d)
    from seqpar.data.inputs import DEFAULT_SPLIT

    split = None if "data.blend" not in blends else (d.split or DEFAULT_SPLIT)
    return IndexedPlan(d, cfg.train.seed, tok, blends, split, root)


def _train_samples(cfg: Any) -> int:
    return cfg.train.steps * cfg.data.global_batch


def prepare(cfg: Any, *, build: bool = True, check: bool = True) -> None:
    """Check the recipe's data inputs (``check``: the files, as ``load_recipe(check_files=True)`` does;
    always: every split holds a window) and, with ``build``, build every cache its run reads, once
    (file lock, atomic publish; see the module docstring). Call it before any process group (the CLI
    does, on every rank); it runs no collective. Raises ``ConfigError`` (one line, naming the field)."""
    from seqpar.megatron.parallel import has_process_group

    if has_process_group():
        raise RuntimeError("seqpar.data.prepare runs before the process groups (megatron's dataset builder is "
                           "collective once they exist); build_sources handles the other case")
    d = cfg.data
    if check:
        check_inputs(d)
    if d.dataset == "mqar" or (d.dataset == "text" and not build):
        return
    root = cache_root(d)
    tok = _tokenizer(d, root) if build or d.tokenizer != "train" else None
    if d.dataset in ("indexed", "hf") and (build or d.dataset == "indexed"):
        plan = _indexed_plan(cfg, tok, root, build_hf=build)
        blocks = plan.blocks_for(_train_samples(cfg))
        if build and plan.missing(blocks):
            with cache_lock(root):
                plan.build_missing(blocks)


def _build_in_child(cfg: Any, root: pathlib.Path) -> None:
    """``prepare`` in a child process without process groups (this process holds the cache lock)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = pathlib.Path(tmp) / "recipe.json"
        spec.write_text(json.dumps(cfg.to_dict()))
        env = {**os.environ, _LOCK_HELD_ENV: str(root)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        res = subprocess.run([sys.executable, "-m", "seqpar.data.sources", str(spec)], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the data caches in a child process failed:\n{res.stderr[-3000:]}")


def _report(cfg: Any, tok: Optional[Tokenizer], plan: Optional[IndexedPlan]) -> list[str]:
    d = cfg.data
    lines = [f"data: {d.dataset}" + (f", tokenizer {tok.kind} {tok.where} ({tok.vocab_size} ids, "
                                     f"sha256 {tok.fingerprint[:12]})" if tok else "")]
    if plan is None:
        return lines
    need = _train_samples(cfg)
    for i, s in enumerate(SPLITS):
        if not plan.stats[i]:
            continue
        docs = sum(st.documents for st in plan.stats[i])
        toks = sum(st.tokens for st in plan.stats[i])
        longer = sum(st.longer for st in plan.stats[i])
        line = (f"  {s}: {docs:,} documents, {toks:,} tokens, {plan.samples[i]:,} windows of {d.seq_len + 1} "
                f"tokens per epoch")
        if s == "train":
            line += f"; {cfg.train.steps} steps x {d.global_batch} = {need:,} windows ({need / plan.samples[0]:.2f} epochs)"
        if longer:
            line += f"; {longer:,} documents longer than a window are split over consecutive windows (none dropped)"
        lines.append(line)
    return lines


def build_sources(cfg: Any) -> DataSources:
    """The run's :class:`DataSources` on this rank. Every rank calls it (after the process groups
    exist: megatron's builder is then collective, with every cache in place — see the module
    docstring). Bad input raises ``ConfigError`` naming the field; with process groups, a failure on
    any rank raises on every rank before any collective (``raise_if_any_rank_failed``), so no rank is
    left waiting in megatron's builder or the engine's first collective."""
    from seqpar.megatron.parallel import raise_if_any_rank_failed

    local, error = None, None
    try:  # everything up to megatron's collective dataset build is this rank's own work
        local = _local_sources(cfg)
    except Exception as e:  # noqa: BLE001 - every rank learns of it, then it is raised
        error = e
    raise_if_any_rank_failed(error)
    if isinstance(local, DataSources):
        return local
    plan, blocks, tok = local
    built = plan.load(blocks)
    train = GPTSource([b[0] for b in built], plan.samples[0], "train")
    valid, test = (GPTSource([built[0][i]], 0, s) if built[0][i] is not None else None
                   for i, s in ((1, "valid"), (2, "test")))
    return DataSources(train, valid, test, tok, cfg.data.vocab_size, _report(cfg, tok, plan))


def _local_sources(cfg: Any) -> DataSources | tuple[IndexedPlan, int, Tokenizer]:
    """This rank's part of :func:`build_sources` (no collective): the finished sources (mqar, text), or
    an indexed plan with its blocks' caches in place and the tokenizer."""
    from seqpar.data.datasets import MQARDataset, PackedTextDataset
    from seqpar.data.tokenizer import corpus_summary, load_documents

    d, seed = cfg.data, cfg.train.seed
    if d.dataset == "mqar":
        mk = lambda s: MQARDataset(d.vocab_size, d.seq_len, d.mqar_pairs, d.mqar_queries, seed=s)  # noqa: E731
        # held-out MQAR: the same task from another seed (disjoint random streams)
        return DataSources(mk(seed), mk(seed + 1_000_003), None, None, d.vocab_size, [f"data: mqar ({d.vocab_size} ids)"])
    root = cache_root(d)
    tok = _tokenizer(d, root)
    if tok.vocab_size > d.vocab_size:
        raise ConfigError(f"data.tokenizer has {tok.vocab_size} token ids, more than data.vocab_size={d.vocab_size}; "
                          f"set data.vocab_size >= {tok.vocab_size}")
    if d.dataset == "text":
        docs = load_documents(d.text_files, d.max_bytes)
        train = PackedTextDataset.from_documents(tok, docs, d.seq_len, seed=seed)
        # what data.max_bytes lets in: never cut silently
        summary = corpus_summary(d.text_files, d.max_bytes, docs, train.ids.numel(), d.seq_len)
        return DataSources(train, None, None, tok, d.vocab_size, _report(cfg, tok, None) + summary.splitlines())
    plan = _indexed_plan(cfg, tok, root, build_hf=True)
    blocks = plan.blocks_for(_train_samples(cfg))
    from seqpar.megatron.parallel import has_process_group

    if plan.missing(blocks):
        with cache_lock(root):
            if plan.missing(blocks):
                if has_process_group():
                    _build_in_child(cfg, root)
                else:
                    plan.build_missing(blocks)
    return plan, blocks, tok


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m seqpar.data.sources RECIPE.json``: :func:`prepare` (build only: the parent checked the
    inputs) for a resolved recipe, as attributes (the child process of :func:`build_sources`; seqpar.data
    does not import the recipe schema of seqpar.train)."""
    import types

    args = sys.argv[1:] if argv is None else argv
    tree = json.loads(pathlib.Path(args[0]).read_text())
    cfg = types.SimpleNamespace(**{k: types.SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in tree.items()})
    cfg.to_dict = lambda: tree
    prepare(cfg, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
