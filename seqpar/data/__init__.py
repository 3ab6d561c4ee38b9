"""seqpar.data: local tokenizer training (sentencepiece), packed datasets, synthetic tasks (MQAR)."""

from seqpar.data.datasets import MQARDataset, PackedTextDataset, encode_documents
from seqpar.data.tokenizer import corpus_summary, get_tokenizer, load_documents, load_text, stdlib_corpus

__all__ = ["MQARDataset", "PackedTextDataset", "corpus_summary", "encode_documents", "get_tokenizer", "load_documents",
           "load_text",
           "stdlib_corpus"]
