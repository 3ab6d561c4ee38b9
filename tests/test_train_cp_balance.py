"""The trainer's CP split through one resolved ``cp.Partition`` (issue 22 item 4, trainer wiring), on
the host without process groups (the CP rank and size are patched into megatron's parallel_state):

- ``parallel.cp_balance: zigzag`` gives exactly what Megatron's split gave before: ``local_batch``
  equals ``get_batch_on_this_cp_rank`` for every rank (P = 2 and 4), and the packed RoPE rows
  (``seqpar.megatron.packed.rope_positions``, from the partition's token index) equal megatron-core's
  own THD rows (``_get_thd_freqs_on_this_cp_rank``) for the exact and the per-document table;
- under ``cost`` the micro-batch's partition is the cost balancer's, every per-token tensor is
  sharded with it, and RoPE's rows are each token's position in its document (the data's own
  ``position_ids``) on every rank;
- ``cost_model`` describes the recipe's model once (layer kinds over the tiled pattern, heads, S2
  layout, MoH's active heads, Lightning's linear work).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [[7, 12, 13], [19, 13]]  # two rows of 32 tokens, no document a multiple of 2 x CP


def _cp(monkeypatch, rank: int, world: int) -> None:
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: world)
    monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)


def _batch():
    from seqpar.data import Batch

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 32), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    return Batch(tokens, torch.roll(tokens, -1, 1), torch.ones(2, 32), pos)


def _cfg(extra=()):
    from seqpar.train.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml",
                       ["data.seq_len=32", "model.s2_local_blocks=1", "model.s2_vert_stride=2", *extra],
                       check_files=False)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_local_batch_is_megatrons_split(monkeypatch, world):
    from megatron.core.utils import get_batch_on_this_cp_rank

    from seqpar.train.runtime import local_batch

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (3, 8 * world), generator=g)
    pos = torch.arange(8 * world).expand_as(t)
    for rank in range(world):
        _cp(monkeypatch, rank, world)
        want = get_batch_on_this_cp_rank({"tokens": t, "labels": t + 1, "loss_mask": t % 3, "position_ids": pos})
        got = local_batch(t, t + 1, t % 3, pos)
        assert got["partition"].balance == "zigzag"
        for k, v in want.items():
            assert torch.equal(got[k], v), (rank, k)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_packed_rope_rows_are_megatrons(monkeypatch, world):
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    from seqpar.megatron.packed import rope_positions
    from seqpar.train.runtime import micro_batches

    for rank in range(world):
        _cp(monkeypatch, rank, world)
        mb = micro_batches(_batch(), 0)[0]  # both rows: one packed micro-batch
        part, psp = mb["partition"], mb["packed_seq_params"]
        assert part is psp.partition and part.balance == "zigzag"
        cu = psp.cu_seqlens_q_padded.tolist()
        for table in (cu[-1], psp.max_seqlen_q):  # exact (global offsets) and per-document rows
            freqs = torch.arange(table, dtype=torch.float64)
            want = torch.cat([_get_thd_freqs_on_this_cp_rank(rank, world, torch.empty((b - a) // world), freqs,
                                                             a if table == cu[-1] else 0)
                              for a, b in zip(cu[:-1], cu[1:])])
            got = rope_positions(part, rank, table, torch.device("cpu"))
            assert torch.equal(got, want.long()), (rank, table)


def test_cost_partition_shards_every_tensor_and_rope_reads_document_positions(monkeypatch):
    from seqpar import cp
    from seqpar.megatron.packed import rope_positions
    from seqpar.train.runtime import CPBalance, micro_batches

    cfg = _cfg(["model.pattern=SA", "parallel.cp_balance=cost"])
    balance = CPBalance.of(cfg)
    assert balance.balance == "cost" and balance.cost == CPBalance.of(cfg).cost  # one description of the model
    batch = _batch()
    tokens = []
    for rank in range(2):
        _cp(monkeypatch, rank, 2)
        mb = micro_batches(batch, 0, balance)[0]
        part = mb["partition"]
        assert part.balance == "cost" and mb["packed_seq_params"].partition is part
        zig = cp.make_partition(part.seq_len, (rank, 2), cu_seqlens=part.doc_bounds,
                                cu_seqlens_unpadded=mb["packed_seq_params"].cu_seqlens_q)
        assert not torch.equal(part.token_index(rank), zig.token_index(rank))  # a different placement
        real = mb["loss_mask"][0] > 0
        pos = rope_positions(part, rank, mb["packed_seq_params"].max_seqlen_q, torch.device("cpu"))
        assert torch.equal(pos[real], mb["position_ids"][0][real])  # each token's place in its document
        tokens.append(mb["tokens"][0][real])
    # the two ranks' real tokens are the batch's, each once
    assert sorted(torch.cat(tokens).tolist()) == sorted(batch.tokens.flatten().tolist())


def test_cost_model_of_the_recipe():
    from seqpar.train.runtime import CPBalance, cost_model

    cfg = _cfg(["model.num_layers=8", "model.moh_top_k=2"])
    m = cost_model(cfg)
    assert dict(m.layers) == {"softmax": 2, "s2": 2, "lightning": 2, "moh": 2}  # ASLH tiled over 8 layers
    assert (m.heads, m.kv_heads, m.moh_active) == (4, 2, 3 / 4)  # 1 shared + top-2 of 4 heads
    assert (m.s2_layout.block_size, m.s2_layout.local_blocks, m.s2_layout.vert_stride) == (16, 1, 2)
    assert m.linear_cost == pytest.approx((64 + 1) / 2 + 16)  # Lightning chunk 64, head_dim 16
    assert CPBalance.of(_cfg(["parallel.context_parallel=1"])).cost is None  # no CP, no cost to balance
