"""Datasets addressed by (step, rank): a batch depends only on the step and the seed, so a resumed
run reads exactly the batches an uninterrupted one would.

``PackedTextDataset``: a token stream cut into ``seq_len + 1`` windows, visited in a seeded
permutation; ``PackedTextDataset.from_documents`` builds the stream from documents, each followed by
the tokenizer's EOS (so a window that spans two documents sees where one ends)::

    doc A tokens | EOS | doc B tokens | EOS | doc C ...   ->   windows of seq_len + 1 tokens

``MQARDataset``: Zoology's multi-query associative recall (one document per sequence).
Both return a :class:`~seqpar.data.batch.Batch` (``[batch, seq_len]`` tokens, labels, loss mask and
the position ids that carry the document boundaries).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from seqpar.data.batch import Batch, position_ids_from_eod
from seqpar.data.tokenizer import Tokenizer
from seqpar.errors import ConfigError


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """int64 ``[total]``: every document's tokens followed by the tokenizer's EOD (refused when it
    has none)."""
    eos = tokenizer.require_eod()
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer.encode(doc))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class PackedTextDataset:
    """Packed language-modelling windows over a 1-D token tensor (``ids`` as given; use
    :meth:`from_documents` for documents joined by EOS). ``eod``: the token that ends a document
    (positions restart after it); None = the stream is one document."""

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int = 0, eod: Optional[int] = None) -> None:
        if ids.dim() != 1:
            raise ValueError("ids must be a 1-D token tensor")
        self.seq_len = seq_len
        self.num_windows = (ids.numel() - 1) // seq_len
        if self.num_windows < 1:  # a recipe value that only the data can judge: one line, exit 2 (ConfigError)
            raise ConfigError(f"the corpus has {ids.numel()} tokens, fewer than data.seq_len + 1 = {seq_len + 1}; "
                              f"lower data.seq_len or add text (data.text_files, data.max_bytes)")
        self.ids = ids
        self.seed = seed
        self.eod = eod

    @classmethod
    def from_documents(cls, tokenizer: Tokenizer, documents: Sequence[str], seq_len: int, seed: int = 0
                       ) -> "PackedTextDataset":
        """Windows over ``documents`` encoded by ``tokenizer``, each followed by EOS
        (:func:`encode_documents`)."""
        return cls(encode_documents(tokenizer, documents), seq_len, seed, eod=tokenizer.require_eod())

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=g)

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1) -> Batch:
        """Rows ``[rank::ranks]`` of the global batch of ``step``."""
        rows = []
        for i in range(rank, global_batch, ranks):
            n = step * global_batch + i
            w = int(self._order(n // self.num_windows)[n % self.num_windows])
            rows.append(self.ids[w * self.seq_len:(w + 1) * self.seq_len + 1])
        x = torch.stack(rows)
        tokens = x[:, :-1].contiguous()
        pos = (torch.arange(self.seq_len).expand_as(tokens).contiguous() if self.eod is None
               else position_ids_from_eod(tokens, self.eod))
        return Batch(tokens, x[:, 1:].contiguous(), torch.ones(x.shape[0], self.seq_len), pos)


class MQARDataset:
    """Multi-query associative recall (Zoology): ``k1 v1 k2 v2 ... | q a q a ...`` where each query
    key ``q`` was bound to ``a`` earlier; the loss counts only the answer predictions.

    Keys come from ``[4, vocab/2)``, values from ``[vocab/2, vocab)``; ``num_pairs`` pairs, then
    ``num_queries`` (query, answer) pairs, then padding (token 0, masked).

    ``spread=True`` is Zoology's long-context form: the (query, answer) pairs sit at uniformly
    random, ordered, non-overlapping 2-token slots of the rest of the sequence, and every other
    position holds a random value token (noise, never scored), so ``seq_len`` sets how far back a
    query must look and how much noise lies in between. Differences from Zoology, for small
    vocabularies: the noise never holds a key (Zoology draws it from the whole vocabulary, where
    among its 8192 tokens a key rarely repeats by chance; among 64 it would in most sequences), and
    the query slots are uniform (Zoology's power law favours the slots right after the pairs).
    """

    def __init__(self, vocab_size: int, seq_len: int, num_pairs: int = 8, num_queries: int = 8, seed: int = 0,
                 *, spread: bool = False):
        if 2 * (num_pairs + num_queries) > seq_len:
            raise ValueError(f"MQAR needs seq_len >= 2 * (num_pairs + num_queries) = "
                             f"{2 * (num_pairs + num_queries)}, got {seq_len}")
        if vocab_size // 2 - 4 < num_pairs:
            raise ValueError(f"vocab_size {vocab_size} too small for {num_pairs} distinct keys")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_pairs, self.num_queries, self.seed = num_pairs, num_queries, seed
        self.spread = spread

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1) -> Batch:
        """Rows ``[rank::ranks]`` of the global batch of ``step``; each row is one document."""
        half = self.vocab_size // 2
        toks, masks = [], []
        for i in range(rank, global_batch, ranks):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * global_batch + i)
            keys = torch.randperm(half - 4, generator=g)[: self.num_pairs] + 4
            vals = torch.randint(half, self.vocab_size, (self.num_pairs,), generator=g)
            pick = torch.randint(0, self.num_pairs, (self.num_queries,), generator=g)
            seq = torch.zeros(self.seq_len + 1, dtype=torch.long)
            mask = torch.zeros(self.seq_len)
            kv = torch.stack([keys, vals], dim=1).reshape(-1)
            seq[: kv.numel()] = kv
            start = kv.numel()
            if self.spread:  # noise everywhere after the pairs, then the queries in random slots
                seq[start:] = torch.randint(half, self.vocab_size, (self.seq_len + 1 - start,), generator=g)
                slots = (self.seq_len + 1 - start) // 2
                at = start + 2 * torch.randperm(slots, generator=g)[: self.num_queries].sort().values
                seq[at], seq[at + 1] = keys[pick], vals[pick]
                mask[at] = 1.0
            else:
                qa = torch.stack([keys[pick], vals[pick]], dim=1).reshape(-1)
                seq[start:start + qa.numel()] = qa
                mask[start:start + qa.numel():2] = 1.0  # predict the answer after each query key
            toks.append(seq)
            masks.append(mask)
        x = torch.stack(toks)
        tokens = x[:, :-1].contiguous()
        return Batch(tokens, x[:, 1:].contiguous(), torch.stack(masks),
                     torch.arange(self.seq_len).expand_as(tokens).contiguous())
