"""A tiny corpus and tokenizers made locally for the data tests (no downloads): two JSON Lines sources
of pseudo-words, a sentencepiece BPE model (EOS id 3), one without an EOS, and a Hugging Face
byte-level BPE tokenizer folder (``tokenizer.json`` + config, EOS ``<|endoftext|>``)."""

from __future__ import annotations

import json
import pathlib
import random

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "ba", "di", "fo", "gu", "he", "ja"]


def documents(n: int, seed: int) -> list[str]:
    """``n`` documents of random pseudo-words, most short (2-6 words), one in five long (20-60 words):
    whole documents are unique token sequences."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))  # noqa: E731
    size = lambda: rng.randint(20, 60) if rng.random() < 0.2 else rng.randint(2, 6)  # noqa: E731
    return [f"doc{seed}x{i} " + " ".join(word() for _ in range(size())) + "." for i in range(n)]


def write_jsonl(path: pathlib.Path, docs: list[str], key: str = "text") -> pathlib.Path:
    with path.open("w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({key: d, "id": i}) + "\n")
    return path


def sentencepiece_model(folder: pathlib.Path, docs: list[str], name: str = "sp", eos: bool = True,
                        vocab: int = 300) -> pathlib.Path:
    import sentencepiece as spm

    text = folder / f"{name}.txt"
    text.write_text("\n".join(docs))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / name), vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1, bos_id=2,
                                   eos_id=3 if eos else -1, minloglevel=2, num_threads=1)
    return folder / f"{name}.model"


def hf_tokenizer(folder: pathlib.Path, docs: list[str], vocab: int = 300) -> pathlib.Path:
    """A byte-level BPE ``PreTrainedTokenizerFast`` saved in ``folder`` (``tokenizer.json`` + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder
