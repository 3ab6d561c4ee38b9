"""seqpar.cp: context parallelism for every attention kind (docs/cp.md).

``comm.py`` is the only attention-path module that calls torch.distributed.

``cp.attention(q, k, v, kind=..., scheme=..., group=..., balance=...)`` on this rank's shards
(``cp.shard`` / ``cp.shard_varlen``) equals the single-device op on the full input, outputs and
gradients. Bytes each rank *receives* per layer (N global tokens, P ranks, e bytes/element,
batch b; ``cp.scheme_cost`` returns them exactly and ``cp.comm_ledger`` measures them):

- allgather, softmax/moh: ``(P-1)/P·N·b·H_kv·(d+dv)·e``, 1 all-gather; backward the same as
  1 reduce-scatter.
- allgather, s2 (stride-aware exchange): exactly the (kv head, block) pairs of other ranks that
  this rank's queries read (per sparse head ``≈ 1/vert_stride`` of the causally needed blocks,
  plus the window blocks before each chunk; per rank, rank 0 the most), 1 variable-size
  all-to-all (backward 1, the reverse splits); TP slices via ``kv_head_offset`` / ``total_kv_heads``.
- ring, softmax/s2/moh: the same K/V bytes in P-1 send/recv; backward P-1 K/V hops plus P hops
  of the fp32 dK/dV buffer (the kernel's backward with the merged (out, lse); no recompute).
- ulysses, softmax/s2/moh/lightning: 4 all-to-alls (q, k, v, o; +1 for MoH gates), together
  ``(P-1)/P·(N/P)·b·(H + H_kv')·(d+dv)·e`` with ``H_kv' = max(H_kv, P)``; backward the same.
  S2 patterns, MoH gates and Lightning slopes follow each head's *global* index
  (``s2_attention(kv_head_offset=, total_kv_heads=)``; replicated kv heads map to their source).
- usp (``ulysses_degree=U``), softmax/s2/moh: Ulysses over U ranks (all-to-alls as above with
  U for P), then ring over the P/U groups (``(P/U-1)`` K/V passes of ``N/P·b·H_kv'·(d+dv)·e``,
  ``H_kv' = max(H_kv, U)``; backward adds P/U fp32 dK/dV hops).
- usp, lightning: the Ulysses all-to-alls over U, then LASP-2 over the P/U ring:
  ``(P/U-1)·U·c·b·(H/U)·dk·dv·4`` (1 all-gather; backward 1 reduce-scatter), independent of N;
  ``output_final_state`` adds an all-gather of ``(U-1)·(H/U)·b·dk·dv·4`` over the heads.
- ring = LASP-1, lightning: one fp32 state ``b·H·dk·dv·4`` per hop along a sequential chain
  (for comparison; ``cp.recommend`` never picks it); ``output_final_state`` adds one all-gather
  of ``(P-1)·b·H·dk·dv·4`` (backward: reduce-scatter).
- allgather = LASP-2, lightning: ``(P-1)·c·b·H·dk·dv·4`` (c = 2 chunks per rank under zigzag,
  1 contiguous), independent of N; 1 all-gather, backward 1 reduce-scatter.

Validation: ``cp.attention`` checks every argument locally (including data: MoH gates >= 0,
Lightning slopes finite and >= 0), then the ranks agree with one int32 all-reduce
(``Comm.agree``) before any data moves, and every rank raises the failing rank's ValueError. The
handshake is *not* recorded in the ledger nor counted by ``scheme_cost`` (it carries no attention
data). Inside ``cp.step_checks()`` (one training step) data checks are read once at the step's end
and each call signature is agreed once: 0 host syncs per layer (see ``seqpar.cp.validation``).
Padded varlen documents (``pad_varlen``): ``cu_seqlens_unpadded`` makes the Lightning final state
the state after each document's last real token.

Supported kind x scheme (all 16 pairs, each tested at P = 2 and 4):

=========  =========  ======  =======  ================
kind       allgather  ring    ulysses  usp
=========  =========  ======  =======  ================
softmax    yes        yes     yes      yes
s2         exchange   yes     yes      yes
lightning  LASP-2     LASP-1  yes      Ulysses x LASP-2
moh        yes        yes     yes      yes
=========  =========  ======  =======  ================

Limits: ulysses needs H % P == 0 and H_kv % P == 0 or P % H_kv == 0 (kv heads replicated); usp
the same with U; zigzag needs N % 2P == 0 (contiguous N % P); s2 under allgather/ring/usp needs
chunks of whole blocks (ulysses runs on the whole sequence and does not); varlen (global
``cu_seqlens``, every document a multiple of 2P, see ``cp.pad_varlen``) with allgather/ulysses
for softmax and lightning. LASP-1 (lightning ring) takes initial/final states but no varlen
(ValueError); usp takes no varlen.
"""

from seqpar.cp.api import KINDS, SCHEMES, SUPPORTED, attention, recommend, scheme_cost
from seqpar.cp.comm import Comm, CommLedger, CommRecord, comm_ledger
from seqpar.cp.merge import decayed_state_prefix, merge_partials, merge_two
from seqpar.cp.validation import SyncCount, count_host_syncs, step_checks
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
    "BALANCERS", "KINDS", "SCHEMES", "SUPPORTED", "Comm", "CommLedger", "CommRecord", "Layout", "Partition", "Piece",
    "SyncCount", "VarlenPadding", "attention", "make_partition",
    "count_host_syncs", "step_checks",
    "causal_work", "chunk_ids", "comm_ledger", "decayed_state_prefix", "imbalance", "merge_partials",
    "merge_two", "pad_varlen", "recommend", "scheme_cost", "shard", "shard_varlen", "token_index", "unpad_varlen",
    "unshard", "unshard_varlen", "varlen_token_index",
]
