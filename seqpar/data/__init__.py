"""seqpar.data: local tokenizer training (sentencepiece), packed datasets, synthetic tasks (MQAR)."""

from seqpar.data.datasets import MQARDataset, PackedTextDataset
from seqpar.data.tokenizer import get_tokenizer, load_text, stdlib_corpus

__all__ = ["MQARDataset", "PackedTextDataset", "get_tokenizer", "load_text", "stdlib_corpus"]
