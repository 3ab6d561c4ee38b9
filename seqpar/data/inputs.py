"""The data fields of a recipe, checked: blends and splits in Megatron's forms (pure, run by the
recipe schema's validators) and the files they name (:func:`check_inputs`, run before any process
group by the CLI through ``seqpar.train.config.load_recipe(..., check_files=True)``).

Every error is one line naming the field, the value and the fix (a ``ConfigError``)."""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Optional, Sequence

from seqpar.errors import ConfigError

DEFAULT_SPLIT = "969,30,1"
"""Megatron-LM's default train / valid / test split (by documents) of a blend."""
SPLITS = ("train", "valid", "test")


def preprocess_command(prefix: str, tokenizer: str = "TOKENIZER") -> str:
    """The command that makes ``prefix.bin`` / ``prefix.idx`` (named in missing-file errors)."""
    return (f"python -m seqpar.data.preprocess --input corpus.jsonl --json-key text --tokenizer {tokenizer} "
            f"--output-prefix {prefix}")


def parse_blend(value: Sequence[Any], field: str) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's ``--data-path`` form -> (prefixes, weights or None).

    ``[PREFIX, ...]`` (weights by size) or ``[W1, PREFIX1, W2, PREFIX2, ...]`` with every weight a finite
    number > 0 (normalised by megatron)."""
    items = list(value)
    if not items:
        raise ConfigError(f"{field}: empty; give [PREFIX] or [WEIGHT, PREFIX, WEIGHT, PREFIX, ...]")
    if all(isinstance(x, str) for x in items):
        prefixes, weights = items, None
    else:
        if len(items) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in items[::2]) \
                or not all(isinstance(p, str) for p in items[1::2]):
            raise ConfigError(f"{field}={items!r}: expected [PREFIX, ...] or [WEIGHT, PREFIX, WEIGHT, PREFIX, ...] "
                              f"(a number before every prefix), as Megatron's --data-path")
        weights, prefixes = [float(w) for w in items[::2]], list(items[1::2])
        bad = [w for w in weights if not math.isfinite(w) or w <= 0]
        if bad:
            raise ConfigError(f"{field}: weight {bad[0]!r} must be a finite number > 0 (weights are relative; drop "
                              f"a source instead of giving it weight 0)")
    empty = [p for p in prefixes if not p.strip()]
    if empty:
        raise ConfigError(f"{field}: an empty prefix; give the path prefix of PREFIX.bin / PREFIX.idx")
    dup = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if dup:
        raise ConfigError(f"{field}: prefix {dup[0]!r} appears twice; give each source once with its total weight")
    return prefixes, weights


_SPLIT = re.compile(r"^\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}$")


def parse_split(value: str, field: str = "data.split") -> list[float]:
    """``"969,30,1"`` (1 to 3 non-negative numbers: train, valid, test shares by documents, missing
    ones 0) -> the three shares as given (megatron's ``parse_and_normalize_split`` normalises them when
    the datasets are built); the train share must be > 0."""
    if not isinstance(value, str) or not _SPLIT.match(value):
        raise ConfigError(f"{field}={value!r} does not parse; give 1 to 3 comma-separated non-negative numbers, "
                          f"the train, valid and test shares of each prefix's documents (e.g. {DEFAULT_SPLIT!r})")
    parts = [float(x) for x in value.split(",")]
    if parts[0] <= 0:
        raise ConfigError(f"{field}={value!r}: the train share must be > 0 (e.g. {DEFAULT_SPLIT!r})")
    return parts + [0.0] * (3 - len(parts))


def _prefix_missing(prefix: str) -> Optional[str]:
    for suffix in (".bin", ".idx"):
        if not pathlib.Path(prefix + suffix).is_file():
            return prefix + suffix
    return None


def check_inputs(data: Any) -> None:
    """The files a recipe's ``data`` section names exist and fit (a ``DataConfig``): every blend prefix's
    ``.bin`` / ``.idx`` (the message gives the preprocess command), the tokenizer (loadable, has an EOD,
    no larger than ``data.vocab_size``), the HF files. ``data.text_files``, like every plain path field, is
    checked by ``RunConfig.check_paths`` (its ``RecipePath`` mark). Raises one :class:`ConfigError` with a
    line per problem."""
    from seqpar.data.documents import DocumentError, check_files
    from seqpar.data.tokenizer import Tokenizer, TokenizerError

    d = data
    if d.dataset == "mqar":
        return
    problems = []
    if d.dataset == "indexed":
        for field, blend in blends_of(d).items():
            for prefix in (blend[0] if blend else []):
                missing = _prefix_missing(prefix)
                if missing:
                    problems.append(f"{field}: {missing} not found; make it with: "
                                    f"{preprocess_command(prefix, d.tokenizer)}")
    elif d.dataset == "hf":
        try:
            check_files(d.files, d.json_key, field="data.files")
        except DocumentError as e:
            problems.append(str(e))
    if d.tokenizer != "train":
        try:
            tok = Tokenizer.load(d.tokenizer, d.cache_dir or None)
            tok.require_eod()
            if tok.vocab_size > d.vocab_size:
                problems.append(f"data.tokenizer={d.tokenizer!r} has {tok.vocab_size} token ids, more than "
                                f"data.vocab_size={d.vocab_size} (the model's vocabulary); set data.vocab_size >= "
                                f"{tok.vocab_size} (e.g. {-(-tok.vocab_size // 128) * 128}, a multiple of 128)")
        except TokenizerError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))


def blends_of(d: Any) -> dict[str, Optional[tuple[list[str], Optional[list[float]]]]]:
    """``{field: (prefixes, weights) or None}`` of an indexed ``DataConfig``: ``data.blend`` alone, or
    the per-split ``data.train_blend`` / ``valid_blend`` / ``test_blend``."""
    if d.blend:
        return {"data.blend": parse_blend(d.blend, "data.blend")}
    return {f"data.{s}_blend": (parse_blend(getattr(d, f"{s}_blend"), f"data.{s}_blend")
                                if getattr(d, f"{s}_blend") else None) for s in SPLITS}
