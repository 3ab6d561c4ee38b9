"""seqpar.data: tokenizers (bring your own, or train a sentencepiece model for demos), preprocessing
into megatron-core .bin/.idx, the run's data sources (megatron GPTDataset blends and splits, local
jsonl / parquet through Hugging Face datasets, packed text, MQAR) and the batch contract
(:class:`Batch`: tokens, labels, loss mask and the position ids that mark document boundaries)."""

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "batch", "position_ids_from_eod": "batch",
    "MQARDataset": "datasets", "PackedTextDataset": "datasets", "encode_documents": "datasets",
    "DataSources": "sources", "build_sources": "sources", "prepare": "sources",
    "Tokenizer": "tokenizer", "TokenizerError": "tokenizer", "corpus_summary": "tokenizer", "get_tokenizer": "tokenizer",
    "load_documents": "tokenizer", "load_text": "tokenizer", "stdlib_corpus": "tokenizer", "trained_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy: `python -m seqpar.data.<tool>` runs its module once (an eager import here would load it twice),
    # and importing seqpar.data does not pull in megatron-core
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"seqpar.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'seqpar.data' has no attribute {name!r}")
