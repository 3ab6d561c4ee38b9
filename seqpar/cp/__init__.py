"""seqpar.cp: context parallelism for every attention kind (docs/cp.md).

``comm.py`` is the only attention-path module that calls torch.distributed.

``cp.attention(q, k, v, kind=..., scheme=..., group=..., balance=...)`` on this rank's local buffers
(``cp.shard`` / ``cp.make_partition(...).shard``) equals the single-device op on the full input,
outputs and gradients, for sequences of any length and packed documents of any length
(``cu_seqlens``) under every kind x scheme. The placement is resolved once into a
:class:`Partition` (pieces of real tokens per rank, documents, padding; ``cp.BALANCERS`` produce
it) that every strategy receives; ``balance="cost"`` (:class:`CostModel`, ``seqpar/cp/cost.py``)
balances a hybrid model's modelled work over packed documents; ``balance="stride"`` (``block_size=``)
deals S2 blocks round robin (exact everywhere, but it moves more than zigzag: docs/cp.md). Bytes each rank *receives* per layer (N global tokens, L =
ceil(N/P) local slots, P ranks, e bytes/element, batch b; ``cp.scheme_cost`` returns them exactly,
per rank, and ``cp.comm_ledger`` measures them):

- allgather, softmax/moh: ``(P-1)·L·b·H_kv·(d+dv)·e``, 1 all-gather; backward the same as
  1 reduce-scatter. Softmax ``window=W``: only the window's halo (the tokens of other ranks inside
  the windows of this rank's query pieces, ``≤ W-1`` per piece), 1 variable-size all-to-all
  (backward 1); the plain all-gather when that saves nothing on the busiest rank.
- allgather, s2 (stride-aware exchange): exactly the (kv head, token) rows of other ranks that
  this rank's queries read (per sparse head ``≈ 1/vert_stride`` of the causally needed blocks,
  plus the window blocks before each query block; blocks counted inside each document; per rank,
  rank 0 the most), 1 variable-size all-to-all (backward 1, the reverse splits); TP slices via
  ``kv_head_offset`` / ``total_kv_heads``.
- ring, softmax/s2/moh: per step the key pieces of rank ``r - i`` that rank r's queries read (same
  document, causal), received directly; a hop with nothing needed moves nothing; backward the same
  K/V plus the fp32 dK/dV of the rank's own pieces that others read (the kernel's backward with
  the merged (out, lse); no recompute).
- ulysses, softmax/s2/moh/lightning: 4 all-to-alls (q, k, v, o; +1 for MoH gates), together
  ``(P-1)·L·b·(H + H_kv')·(d+dv)·e / P`` with ``H_kv' = max(H_kv, P)``; backward the same.
  S2 patterns, MoH gates and Lightning slopes follow each head's *global* index
  (``s2_attention(kv_head_offset=, total_kv_heads=)``; replicated kv heads map to their source).
  S2's ``head_placement="balanced"`` (default) gives each rank kv heads of complementary stride
  residues (equal block counts, dense heads spread; same bytes; ``seqpar/cp/s2_heads.py``).
- usp (``ulysses_degree=U``), softmax/s2/moh: Ulysses over U ranks, then the ring over the P/U
  groups on the merged buffers; lightning: the all-to-alls, then LASP-2 over the P/U ring;
  ``output_final_state`` adds an all-gather of the states over the heads.
- ring = LASP-1, lightning: one fp32 state ``b·H·dk·dv·4`` per document carried, per message of a
  sequential chain of waves (for comparison; ``cp.recommend`` never picks it: seqpar/cp/auto.py);
  ``output_final_state`` adds one all-gather of ``(P-1)`` states per document.
- allgather = LASP-2, lightning: ``(P-1)·S·b·H·dk·dv·4`` (S: states another rank reads, 2 under
  zigzag, 1 contiguous, about 2 per document), independent of N; 1 all-gather, backward 1
  reduce-scatter.

Validation: ``cp.attention`` checks every argument locally (including data: MoH gates >= 0,
Lightning slopes finite and >= 0), then the ranks agree with one int32 all-reduce
(``Comm.agree``) before any data moves, and every rank raises the failing rank's ValueError. The
handshake is *not* recorded in the ledger nor counted by ``scheme_cost`` (it carries no attention
data). Inside ``cp.step_checks()`` (one training step) data checks are read once at the step's end
and each call signature is agreed once: 0 host syncs per layer (see ``seqpar.cp.validation``).

Supported kind x scheme (all 16 pairs, each tested at P = 2 and 4, with and without packed
documents, at lengths that are no multiple of P):

=========  =========  ======  =======  ================
kind       allgather  ring    ulysses  usp
=========  =========  ======  =======  ================
softmax    yes        yes     yes      yes
s2         exchange   yes     yes      yes
lightning  LASP-2     LASP-1  yes      Ulysses x LASP-2
moh        yes        yes     yes      yes
=========  =========  ======  =======  ================

Limits: ulysses needs H % P == 0 and H_kv % P == 0 or P % H_kv == 0 (kv heads replicated); usp
the same with U; varlen (``cu_seqlens``) needs batch 1. Padding slots (``P·L - N`` of them, at the
sequence end; Megatron's per-document pads with ``cu_seqlens_unpadded``) output 0 and get no
gradient; pass ``seq_len=N`` when N is not a multiple of P.
"""

from seqpar.cp.api import KINDS, SCHEMES, SUPPORTED, attention, scheme_cost
from seqpar.cp.auto import Candidate, Recommendation, SchemePlan, Topology, choose_schemes, predict, recommend
from seqpar.cp.cost import CostModel
from seqpar.cp.comm import Comm, CommLedger, CommRecord, comm_ledger
from seqpar.cp.merge import decayed_state_prefix, merge_partials, merge_two
from seqpar.cp.syncs import SyncCount, count_host_syncs
from seqpar.cp.validation import step_checks
from seqpar.cp.partition import (
    BALANCERS,
    Layout,
    Partition,
    Piece,
    VarlenPadding,
    causal_work,
    chunk_ids,
    imbalance,
    pad_varlen,
    make_partition,
    shard,
    shard_varlen,
    token_index,
    unpad_varlen,
    unshard,
    unshard_varlen,
    varlen_token_index,
)

__all__ = [
    "BALANCERS", "Candidate", "KINDS", "Recommendation", "SchemePlan", "Topology", "choose_schemes", "predict", "SCHEMES", "SUPPORTED", "Comm", "CostModel", "CommLedger", "CommRecord", "Layout", "Partition", "Piece",
    "SyncCount", "VarlenPadding", "attention", "make_partition",
    "count_host_syncs", "step_checks",
    "causal_work", "chunk_ids", "comm_ledger", "decayed_state_prefix", "imbalance", "merge_partials",
    "merge_two", "pad_varlen", "recommend", "scheme_cost", "shard", "shard_varlen", "token_index", "unpad_varlen",
    "unshard", "unshard_varlen", "varlen_token_index",
]
