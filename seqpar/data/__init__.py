"""seqpar.data: local tokenizer training (sentencepiece), packed datasets, synthetic tasks (MQAR)."""
