"""seqpar.cp: context parallelism for every attention kind (DESIGN.md §1-2).

``comm.py`` is the only attention-path module that calls torch.distributed.
"""

from seqpar.cp.api import KINDS, SCHEMES, SUPPORTED, attention, recommend, scheme_cost
from seqpar.cp.comm import Comm, CommLedger, CommRecord, comm_ledger
from seqpar.cp.merge import decayed_state_prefix, merge_partials, merge_two
from seqpar.cp.partition import (
    VarlenPadding,
    causal_work,
    chunk_ids,
    imbalance,
    pad_varlen,
    shard,
    shard_varlen,
    token_index,
    unpad_varlen,
    unshard,
    unshard_varlen,
    varlen_token_index,
)

__all__ = [
    "KINDS", "SCHEMES", "SUPPORTED", "Comm", "CommLedger", "CommRecord", "VarlenPadding", "attention",
    "causal_work", "chunk_ids", "comm_ledger", "decayed_state_prefix", "imbalance", "merge_partials",
    "merge_two", "pad_varlen", "recommend", "scheme_cost", "shard", "shard_varlen", "token_index", "unpad_varlen",
    "unshard", "unshard_varlen", "varlen_token_index",
]
