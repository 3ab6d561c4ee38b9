"""Tokenizers: bring your own (a sentencepiece model file, or a Hugging Face folder with
``tokenizer.json``), or train a sentencepiece model on local text for demos.

:class:`Tokenizer` is what the rest of seqpar sees: megatron-core's tokenizer
(``megatron.core.tokenizers.MegatronTokenizer``, library ``sentencepiece`` or ``huggingface``) loaded
from *exactly* the files it pins — the bytes that every checkpoint stores in ``step_N/tokenizer/``
and that export ships. Two tokenizers are the same iff their files are byte-identical
(:attr:`Tokenizer.fingerprint`); ``--resume`` compares them (``seqpar.train.checkpoint.check_tokenizer``).

``get_tokenizer`` trains the demo's sentencepiece model on first use from local text (the Python
standard library's sources by default; no downloads) and caches it under ``cache_dir``;
``python -m seqpar.data.tokenizer`` trains one from jsonl / text files for your own corpus.
"""

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


# ---------------------------------------------------------------------------------------------------
# bring your own tokenizer (pinned by its files)

SP_MODEL = "tokenizer.model"
"""A sentencepiece tokenizer's one file (its name inside checkpoints and export folders)."""
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "chat_template.jinja")
"""The files of a Hugging Face tokenizer folder that define it (``tokenizer.json`` required); other files
of the folder (model weights, config.json) are not part of the tokenizer and are not pinned."""


class TokenizerError(ConfigError):
    """A tokenizer that cannot be used: names the path / field and the fix."""


def _read_files(path: pathlib.Path, field: str) -> tuple[str, dict[str, bytes]]:
    """(kind, {file name: bytes}) of a tokenizer path: a sentencepiece model file, or a folder with
    ``tokenizer.json`` (Hugging Face) or ``tokenizer.model`` (sentencepiece)."""
    if path.is_file():
        return "sentencepiece", {SP_MODEL: path.read_bytes()}
    if path.is_dir():
        if (path / HF_FILES[0]).is_file():
            return "huggingface", {n: (path / n).read_bytes() for n in HF_FILES if (path / n).is_file()}
        if (path / SP_MODEL).is_file():
            return "sentencepiece", {SP_MODEL: (path / SP_MODEL).read_bytes()}
        raise TokenizerError(f"{field}={str(path)!r} is a folder without {HF_FILES[0]} (Hugging Face) or {SP_MODEL} "
                             f"(sentencepiece); point it at a tokenizer folder or a sentencepiece .model file")
    raise TokenizerError(f"{field}={str(path)!r} does not exist; give a sentencepiece .model file or a Hugging Face "
                         f"tokenizer folder (tokenizer.json), e.g. one trained on your corpus with: python -m "
                         f"seqpar.data.tokenizer --input corpus.jsonl --vocab-size 32000 --output {path}")


def _kind_of(files: dict[str, bytes]) -> str:
    return "huggingface" if HF_FILES[0] in files else "sentencepiece"


class Tokenizer:
    """A tokenizer pinned to its files, run by megatron-core's ``MegatronTokenizer`` (library
    ``sentencepiece`` or ``huggingface``), loaded from a private copy of exactly those files so that
    what a checkpoint stores is what encoded the data.

    Args:
        files: file name -> bytes (``{"tokenizer.model": ...}`` or the :data:`HF_FILES` present).
        where: where the files came from (for messages).
        cache_dir: parent of the private copy (``<cache_dir>/tokenizers/<fingerprint>``); default
            ``$SEQPAR_CACHE`` or ``~/.cache/seqpar``.
    """

    def __init__(self, files: dict[str, bytes], where: str = "", cache_dir: Optional[str | pathlib.Path] = None
                 ) -> None:
        self.files = dict(files)
        self.kind = _kind_of(self.files)
        self.where = where
        self._cache = pathlib.Path(cache_dir or DEFAULT_CACHE)
        self._mt = None

    @classmethod
    def load(cls, path: str | pathlib.Path, cache_dir: Optional[str | pathlib.Path] = None,
             field: str = "data.tokenizer") -> "Tokenizer":
        """The tokenizer at ``path`` (sentencepiece file, or HF / sentencepiece folder); raises
        :class:`TokenizerError` naming ``field`` when it is missing or unreadable."""
        path = pathlib.Path(path)
        _, files = _read_files(path, field)
        tok = cls(files, str(path), cache_dir)
        try:
            tok.megatron
        except TokenizerError:
            raise
        except Exception as e:  # noqa: BLE001 - a file that is not a tokenizer: one line naming it
            raise TokenizerError(f"{field}={str(path)!r} cannot be loaded as a {tok.kind} tokenizer "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return tok

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the file names and contents: equal iff the pinned files are byte-identical."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()

    def save(self, folder: str | pathlib.Path) -> None:
        """Write the pinned files into ``folder`` (created)."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)

    def _materialized(self) -> pathlib.Path:
        """``<cache>/tokenizers/<fingerprint>``: the pinned files alone, written once by tmp + rename."""
        final = self._cache / "tokenizers" / self.fingerprint[:24]
        if not final.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp_", dir=final.parent))
            self.save(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process published it first: same bytes
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return final

    @property
    def megatron(self):
        """megatron-core's tokenizer object (``MegatronTokenizerBase``), loaded on first use."""
        if self._mt is None:
            from megatron.core.tokenizers import MegatronTokenizer

            folder = self._materialized()
            if self.kind == "sentencepiece":
                self._mt = MegatronTokenizer.from_pretrained(str(folder / SP_MODEL),
                                                             metadata_path={"library": "sentencepiece"})
            else:
                try:
                    import transformers  # noqa: F401  megatron's HuggingFaceTokenizer is AutoTokenizer
                except ImportError:
                    raise TokenizerError(f"{self.where}: a Hugging Face tokenizer needs transformers; install "
                                         f"seqpar[export]") from None
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # preprocess forks workers
                # use_fast: the tokenizer.json (Rust) backend; trust_remote_code stays False (no code from disk)
                self._mt = MegatronTokenizer.from_pretrained(str(folder), metadata_path={"library": "huggingface"},
                                                             use_fast=True)
        return self._mt

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added special tokens included)."""
        return int(self.megatron.vocab_size)

    def _id(self, name: str) -> Optional[int]:
        try:
            v = getattr(self.megatron, name)
        except Exception:  # noqa: BLE001 - megatron raises when a library has no such token
            return None
        return None if v is None or int(v) < 0 else int(v)

    @property
    def eod(self) -> Optional[int]:
        """End-of-document id (the EOS token), or None when the tokenizer has none."""
        return self._id("eod")

    @property
    def bos(self) -> Optional[int]:
        return self._id("bos")

    @property
    def pad(self) -> Optional[int]:
        return self._id("pad")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS / EOS added."""
        return list(self.megatron.tokenize(text))

    def decode(self, ids: list[int]) -> str:
        return self.megatron.detokenize(list(ids))

    def require_eod(self, field: str = "data.tokenizer") -> int:
        """The EOD id; :class:`TokenizerError` when the tokenizer has none (documents would run together)."""
        if self.eod is None:
            fix = ("train it with an eos id (spm_train --eos_id=N)" if self.kind == "sentencepiece"
                   else "set eos_token in its tokenizer_config.json")
            raise TokenizerError(f"{field}={self.where!r} has no EOS / end-of-document token, so packed documents "
                                 f"could not be told apart; {fix}, or use another tokenizer")
        return self.eod

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.where!r}, vocab {self.vocab_size}, sha256 {self.fingerprint[:12]})"


def trained_tokenizer(vocab_size: int, text_files: Optional[list[str]], max_bytes: int,
                      cache_dir: Optional[str | pathlib.Path] = None) -> Tokenizer:
    """``data.tokenizer: train``: the sentencepiece model :func:`get_tokenizer` trains on
    ``text_files`` (or the standard library), as a :class:`Tokenizer`. Not collective: concurrent
    callers train into temp names and rename, so they never read a half-written model."""
    sp = get_tokenizer(vocab_size, load_text(text_files, max_bytes), cache_dir)
    return Tokenizer({SP_MODEL: sp.serialized_model_proto()}, f"data.tokenizer=train ({vocab_size} pieces)",
                     cache_dir)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m seqpar.data.tokenizer --input FILES --vocab-size N --output TOKENIZER.model``: train
    the sentencepiece BPE model of :func:`get_tokenizer` (byte fallback, lossless, EOS id 3) on your own
    documents (JSON Lines / parquet / text files, ``seqpar.data.documents``), for ``data.tokenizer`` and
    ``python -m seqpar.data.preprocess --tokenizer``."""
    import argparse
    import shutil
    import sys

    from seqpar.data.documents import DocumentError, check_files, iter_documents

    ap = argparse.ArgumentParser(prog="python -m seqpar.data.tokenizer",
                                 description="Train a sentencepiece BPE tokenizer on local documents.")
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="JSON Lines (.jsonl/.json), parquet, or text files")
    ap.add_argument("--json-key", default="text", help="the field (column) holding each document's text")
    ap.add_argument("--vocab-size", type=int, required=True, help="pieces (>= 512: 256 byte-fallback pieces + merges)")
    ap.add_argument("--output", required=True, help="the .model file to write")
    ap.add_argument("--max-bytes", type=int, default=50_000_000, help="characters of text to train on (default 50M)")
    args = ap.parse_args(argv)
    try:
        if args.vocab_size < 512:
            raise ConfigError(f"--vocab-size={args.vocab_size} must be >= 512 (256 byte-fallback pieces + merges)")
        docs = (text for _, text in iter_documents(check_files(args.input, args.json_key), args.json_key))
        text = "\n".join(_budget(docs, args.max_bytes))
        if not text.strip():
            raise ConfigError("--input holds no text")
        with tempfile.TemporaryDirectory() as cache:
            get_tokenizer(args.vocab_size, text, cache)
            model = next(pathlib.Path(cache).glob("spm_*.model"))
            pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model, args.output)
    except (ConfigError, DocumentError, OSError, RuntimeError) as e:
        print(f"seqpar.data.tokenizer: error: {str(e).splitlines()[0] if str(e) else e!r}", file=sys.stderr)
        return 2
    print(f"[seqpar.data.tokenizer] wrote {args.output} ({args.vocab_size} pieces, trained on {len(text):,} "
          f"characters)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
