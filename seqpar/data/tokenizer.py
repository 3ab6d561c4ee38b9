"""A sentencepiece tokenizer trained on first use from local text (the Python standard library's
sources by default; no downloads) and cached under ``cache_dir``."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sysconfig
import tempfile
from typing import Optional

from seqpar.errors import ConfigError

DEFAULT_CACHE = pathlib.Path(os.environ.get("SEQPAR_CACHE", pathlib.Path.home() / ".cache" / "seqpar"))


def _stdlib_files() -> list[pathlib.Path]:
    return sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _budget(texts, max_bytes: int) -> list[str]:
    # documents in order until max_bytes characters (the last one cut there)
    out, total = [], 0
    for text in texts:
        if total >= max_bytes:
            break
        out.append(text[:max_bytes - total])
        total += len(out[-1])
    return out


def _read_stdlib():
    for path in _stdlib_files():
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def stdlib_corpus(max_bytes: int = 2_000_000) -> str:
    """Text of the standard library's top-level ``*.py`` files in sorted order, up to ``max_bytes``."""
    parts, total = [], 0
    for text in _read_stdlib():
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not parts:
        raise ValueError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}; pass text_files "
                         f"to train the tokenizer")
    return "\n".join(parts)[:max_bytes]


def load_documents(text_files: Optional[list[str]], max_bytes: int) -> list[str]:
    """The corpus as documents: one per file of ``text_files`` (or per standard-library ``*.py``
    file when None), in order, ``max_bytes`` characters in total (the last document cut there).
    :class:`~seqpar.data.PackedTextDataset.from_documents` joins them with EOS."""
    if not text_files:
        docs = _budget(_read_stdlib(), max_bytes)
        if not docs:
            raise ValueError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}; pass "
                             f"data.text_files")
        return docs
    for f in text_files:
        if not pathlib.Path(f).is_file():
            raise ValueError(f"data.text_files entry {f!r} is not a file")
    return _budget((pathlib.Path(f).read_text(encoding="utf-8", errors="replace") for f in text_files), max_bytes)


def corpus_summary(text_files: Optional[list[str]], max_bytes: int, documents: list[str], num_tokens: int,
                   seq_len: int) -> str:
    """What the run trains on, for the start-up log: the source, its size in characters and documents,
    how much of it ``max_bytes`` lets in (and that the rest is cut, never silently), and the tokens /
    ``seq_len + 1`` windows of the packed stream. ``documents`` is :func:`load_documents`' result and
    ``num_tokens`` the length of the encoded stream (EOS included)."""
    if text_files:
        sizes = [len(pathlib.Path(f).read_text(encoding="utf-8", errors="replace")) for f in text_files]
        source = f"data.text_files ({len(sizes)} file(s))"
    else:
        sizes = [len(t) for t in _read_stdlib()]
        source = f"the Python standard library's {len(sizes)} top-level *.py files (data.text_files: [])"
    total, used = sum(sizes), sum(len(d) for d in documents)
    line = (f"corpus: {source}, {total:,} characters in {len(sizes)} document(s); using {used:,} characters in "
            f"{len(documents)} document(s) = {num_tokens:,} tokens (with EOS), {(num_tokens - 1) // seq_len:,} "
            f"sequences of data.seq_len={seq_len}")
    if used < total:
        whole = len(sizes) - len(documents)
        cut = used < sum(sizes[:len(documents)])
        parts = [f"{whole} whole document(s)"] if whole else []
        parts += ["the end of the last document used"] if cut else []
        line += (f"\n  data.max_bytes={max_bytes:,} leaves out {total - used:,} characters "
                 f"({100 * (total - used) / total:.0f}%): "
                 f"{' and '.join(parts)}; set data.max_bytes={total} to train on all of it")
    return line


def load_text(text_files: Optional[list[str]], max_bytes: int) -> str:
    """Concatenated ``text_files`` (or the stdlib corpus when None), at most ``max_bytes`` characters
    (the tokenizer's training text; the dataset reads :func:`load_documents`)."""
    if not text_files:
        return stdlib_corpus(max_bytes)
    parts = []
    for f in text_files:
        p = pathlib.Path(f)
        if not p.is_file():
            raise ValueError(f"data.text_files entry {f!r} is not a file")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)[:max_bytes]


def get_tokenizer(vocab_size: int, text: str, cache_dir: Optional[pathlib.Path] = None):
    """A ``SentencePieceProcessor`` (BPE, ``vocab_size`` pieces, byte fallback, no
    normalisation: decode(encode(text)) == text, indentation and newlines included) trained on ``text``.

    Cached as ``<cache_dir>/spm_<vocab>_<hash of text>.model``; written to a temp name and renamed so
    concurrent ranks never read a half-written model.
    """
    import sentencepiece as spm

    cache = pathlib.Path(cache_dir or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    model = cache / f"spm_{vocab_size}_{digest}.model"
    if not model.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            corpus = pathlib.Path(tmp) / "corpus.txt"
            corpus.write_text(text, encoding="utf-8")
            prefix = pathlib.Path(tmp) / "spm"
            try:
                spm.SentencePieceTrainer.train(
                    input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
                    byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, input_sentence_size=200_000,
                    shuffle_input_sentence=False, num_threads=1, max_sentence_length=8192,
                    pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
            except RuntimeError as e:  # sentencepiece's "Vocabulary size too high (N). ... <= M."
                if "Vocabulary size too high" not in str(e):
                    raise
                most = re.search(r"<= (\d+)", str(e))
                raise ConfigError(f"data.vocab_size={vocab_size} is more pieces than sentencepiece can learn from "
                                  f"{len(text):,} characters of text" + (f" (at most {most.group(1)})" if most else "")
                                  + "; lower data.vocab_size or give more text (data.text_files, data.max_bytes)"
                                  ) from None
            os.replace(f"{prefix}.model", model)
    return spm.SentencePieceProcessor(model_file=str(model))
