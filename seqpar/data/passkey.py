"""Passkey retrieval ("needle in a haystack") as token ids, for models trained from scratch.

A sequence of ``seq_len + 1`` tokens (inputs are the first ``seq_len``, labels the last)::

    noise ... noise NEEDLE d1 .. dK noise ... noise QUERY d1 .. dK
                    ^ needle at `depth`                ^ the last K + 1 tokens

The haystack is i.i.d. noise tokens; the needle (the NEEDLE marker and a key of ``key_len`` random
digits) starts at ``round(depth * (haystack - needle))`` tokens into it, so depth 0 puts it at the
start of the sequence (the farthest from the query) and depth 1 right before the query. The loss
(and the accuracy) counts the ``key_len`` digit predictions after QUERY: the model must copy the key
it saw behind NEEDLE. Teacher-forced argmax over all ``key_len`` digits equals greedy decoding of the
whole key when every digit is right, so per-sequence exact match is :func:`key_exact_match`.

Token ids: 0 unused (MQAR's padding id), 1 NEEDLE, 2 QUERY, ``[3, 13)`` digits, ``[13, vocab)`` noise.
"""

from __future__ import annotations

from typing import Optional

import torch

from seqpar.data.batch import Batch

NEEDLE = 1
QUERY = 2
FIRST_DIGIT = 3
DIGITS = 10
FIRST_NOISE = FIRST_DIGIT + DIGITS


class PasskeyDataset:
    """Passkey sequences addressed by (step, rank) like :class:`~seqpar.data.MQARDataset`: a batch
    depends only on the seed, the step and the row.

    Args:
        vocab_size: tokens of the model's vocabulary, >= 14 (3 special ids, 10 digits, >= 1 noise id).
        seq_len: input tokens per sequence; the needle and the query take ``2 * (key_len + 1)`` of
            the ``seq_len + 1`` tokens.
        key_len: digits of the key.
        seed: seed of the keys, the noise and (``depth=None``) the depths.
        depth: where the needle sits in the haystack, in ``[0, 1]`` (0 = the start of the sequence,
            1 = right before the query); None = uniformly random per sequence (training).
    """

    def __init__(self, vocab_size: int, seq_len: int, key_len: int = 5, seed: int = 0,
                 depth: Optional[float] = None) -> None:
        if vocab_size <= FIRST_NOISE:
            raise ValueError(f"passkey needs vocab_size > {FIRST_NOISE} (3 special ids, {DIGITS} digits, noise), "
                             f"got {vocab_size}")
        if key_len < 1:
            raise ValueError(f"passkey key_len must be >= 1, got {key_len}")
        if seq_len + 1 < 2 * (key_len + 1):
            raise ValueError(f"passkey needs seq_len >= {2 * (key_len + 1) - 1} for a key of {key_len} digits "
                             f"(needle + query), got {seq_len}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must be in [0, 1] (or None for random), got {depth}")
        self.vocab_size, self.seq_len, self.key_len, self.seed, self.depth = vocab_size, seq_len, key_len, seed, depth

    @property
    def haystack(self) -> int:
        """Tokens before the query: the noise plus the needle."""
        return self.seq_len + 1 - (self.key_len + 1)

    def needle_start(self, depth: float) -> int:
        """Index of the NEEDLE token for ``depth`` in ``[0, 1]``."""
        return round(depth * (self.haystack - (self.key_len + 1)))

    def batch(self, step: int, global_batch: int, rank: int = 0, ranks: int = 1):
        """Rows ``[rank::ranks]`` of the global batch of ``step`` as a :class:`~seqpar.data.Batch`:
        ``tokens``, ``labels``, ``loss_mask``, each ``[rows, seq_len]`` (the mask is 1 on the
        ``key_len`` positions that predict the key), one document per row."""
        k, toks = self.key_len, []
        for i in range(rank, global_batch, ranks):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * global_batch + i)
            key = torch.randint(FIRST_DIGIT, FIRST_NOISE, (k,), generator=g)
            seq = torch.randint(FIRST_NOISE, self.vocab_size, (self.seq_len + 1,), generator=g)
            depth = float(torch.rand((), generator=g)) if self.depth is None else self.depth
            at = self.needle_start(depth)
            seq[at] = NEEDLE
            seq[at + 1:at + 1 + k] = key
            seq[self.haystack] = QUERY
            seq[self.haystack + 1:] = key
            toks.append(seq)
        x = torch.stack(toks)
        mask = torch.zeros(x.shape[0], self.seq_len)
        mask[:, self.haystack:] = 1.0  # QUERY d1 .. d(K-1) predict d1 .. dK
        return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), mask)  # one document per row


def key_exact_match(correct: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, 1.0 where every masked prediction is right (``correct`` and ``loss_mask``
    ``[batch, seq]``): the whole key decoded, not just some digits."""
    wrong = ((~correct.bool()) & loss_mask.bool()).any(dim=1)
    return (~wrong).float()
