"""Mixture-of-Head attention that skips the (token, head) pairs whose gate is 0."""

from .api import moh_attention
from .counter import PairCounter, count_computed_pairs
from .reference import moh_attention_ref

__all__ = ["moh_attention", "moh_attention_ref", "count_computed_pairs", "PairCounter"]
