"""Partition index math, varlen THD split and padding, imbalance metric (no processes)."""

from __future__ import annotations

import pytest
import torch

from seqpar import cp
from seqpar.cp.partition import num_chunks


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_zigzag_chunk_order_is_megatrons(world):
    ids = [cp.chunk_ids(r, world, "zigzag") for r in range(world)]
    assert ids == [(r, 2 * world - 1 - r) for r in range(world)]
    assert sorted(i for pair in ids for i in pair) == list(range(num_chunks(world, "zigzag")))
    assert [cp.chunk_ids(r, world, "contiguous") for r in range(world)] == [(r,) for r in range(world)]


def test_token_index_covers_sequence_once():
    for balance in ("zigzag", "contiguous"):
        idx = torch.cat([cp.token_index(r, 3, 18, balance) for r in range(3)])
        assert torch.equal(idx.sort().values, torch.arange(18))
    assert cp.token_index(1, 3, 18, "zigzag").tolist() == [3, 4, 5, 12, 13, 14]


def test_shard_any_length_pads_at_the_end_and_reports_it():
    x = torch.arange(1., 11.).reshape(1, 10, 1, 1)  # 10 tokens on 4 ranks: 3 slots each, 2 padding
    for balance in ("zigzag", "contiguous"):
        part = cp.make_partition(10, (0, 4), balance=balance)
        assert (part.local_len, part.padding, part.internal_padding) == (3, 2, 2)
        assert sum(part.pad_per_rank) == 2 and "2 padding slot(s)" in part.describe()
        locs = [cp.shard(x, (r, 4), balance=balance) for r in range(4)]
        assert all(loc.shape == (1, 3, 1, 1) for loc in locs)
        for r, loc in enumerate(locs):
            idx = part.token_index(r)
            assert torch.equal(loc.flatten()[idx >= 0], x.flatten()[idx[idx >= 0]])
            assert not loc.flatten()[idx < 0].any() and torch.equal(part.valid(r), idx >= 0)
        # every token exactly once; the pads are the sequence's last slots (the layout of 12 tokens)
        idx = torch.cat([part.token_index(r) for r in range(4)])
        assert torch.equal(idx[idx >= 0].sort().values, torch.arange(10))
        full12 = cp.make_partition(12, (0, 4), balance=balance)
        for r in range(4):
            t = full12.token_index(r)
            assert torch.equal(part.token_index(r), torch.where(t < 10, t, -1))
    # zigzag of 10 on 4: chunks of 2,2,2,2,1,1,1,1 (the extras go one per rank); ranks 0 and 1 hold the pads
    assert [cp.make_partition(10, (0, 4)).token_index(r).tolist() for r in range(4)] == \
        [[0, 1, -1], [2, 3, -1], [4, 5, 9], [6, 7, 8]]
    with pytest.raises(ValueError, match="balance must be one of"):
        cp.shard(x, (0, 2), balance="striped")
    with pytest.raises(ValueError, match="rank < world"):
        cp.shard(x, (2, 2))
    with pytest.raises(ValueError, match="process group"):
        cp.unshard(x, (0, 2))
    with pytest.raises(ValueError, match=r"4 ranks x 2 local tokens cannot hold seq_len 10"):
        cp.make_partition(10, (0, 4), local_len=2)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 9 must equal the global sequence length 10"):
        cp.make_partition(10, (0, 4), cu_seqlens=[0, 4, 9])
    with pytest.raises(ValueError, match="no empty document"):
        cp.make_partition(10, (0, 4), cu_seqlens=[0, 4, 4, 10])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_documents_of_any_length_per_document_zigzag(world):
    lens = [5, 1, 2 * world * 3, 2 * world + 1, 3]  # shorter than a chunk, not multiples of 2P
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    n = cu[-1]
    part = cp.make_partition(n, (0, world), cu_seqlens=cu)
    idx = torch.cat([part.token_index(r) for r in range(world)])
    assert torch.equal(idx[idx >= 0].sort().values, torch.arange(n))
    assert part.local_len == -(-n // world) and part.padding == world * part.local_len - n
    # every document is cut into 2P chunks of n // 2P (+1 for n % 2P of them, at most one per rank
    # and chunk pair); rank r holds chunks r and 2P-1-r of each document, documents in order
    for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        sizes = [sum(p.length for p in part.pieces[r] if p.doc == d) for r in range(world)]
        assert sum(sizes) == b - a and max(sizes) - min(sizes) <= 2
        for r in range(world):
            for p in part.pieces[r]:
                assert part.doc_bounds[p.doc] + p.pos == int(part.token_index(r)[p.local])
    # documents that are multiples of 2P: exactly Megatron's THD split
    cu2 = torch.tensor([0, 2 * world, 2 * world * 3], dtype=torch.int32)
    for r in range(world):
        want = []
        for a, b in ((0, 2 * world), (2 * world, 6 * world)):
            c = (b - a) // (2 * world)
            want += list(range(a + r * c, a + (r + 1) * c)) + list(range(a + (2 * world - 1 - r) * c,
                                                                         a + (2 * world - r) * c))
        assert cp.varlen_token_index(cu2, r, world)[0].tolist() == want


def test_varlen_thd_split_and_padding_report():
    world = 2
    lens = [5, 8, 1, 12]
    cu = torch.tensor([0, 5, 13, 14, 26], dtype=torch.int32)
    x = torch.arange(26.).reshape(1, 26, 1, 1)
    pad = cp.pad_varlen(x, cu, 2 * world, value=-1.0)
    assert pad.pad_per_doc == (3, 0, 3, 0) and pad.total_pad == 6
    assert pad.cu_seqlens.tolist() == [0, 8, 16, 20, 32] and pad.cu_seqlens.dtype == torch.int32
    flat = pad.x.flatten().tolist()
    assert flat[:8] == [0, 1, 2, 3, 4, -1, -1, -1] and flat[16:20] == [13, -1, -1, -1]
    assert torch.equal(cp.unpad_varlen(pad.x, pad), x)
    # per-document zigzag: doc of 8 -> pieces of 2; rank 0 holds pieces 0 and 3 of every document
    idx0, cu0 = cp.varlen_token_index(pad.cu_seqlens, 0, world)
    idx1, cu1 = cp.varlen_token_index(pad.cu_seqlens, 1, world)
    assert cu0.tolist() == cu1.tolist() == [0, 4, 8, 10, 16]
    assert idx0[:4].tolist() == [0, 1, 6, 7] and idx1[:4].tolist() == [2, 3, 4, 5]
    assert idx0[8:10].tolist() == [16, 19] and idx1[8:10].tolist() == [17, 18]
    assert torch.equal(torch.cat([idx0, idx1]).sort().values, torch.arange(32))
    loc, cu_loc = cp.shard_varlen(pad.x, pad.cu_seqlens, (1, world))
    assert torch.equal(loc.flatten(), pad.x.flatten()[idx1]) and torch.equal(cu_loc, cu1)
    assert sum(lens) == 26


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_is_exactly_balanced(world):
    for n in (16 * world, 2 * world * 37):
        w = cp.causal_work(world, n, "zigzag")
        assert len(set(w)) == 1 and sum(w) == n * (n + 1) // 2
        assert cp.imbalance(world, n, "zigzag") == 1.0


def test_contiguous_imbalance_tends_to_1_875_at_p8():
    n = 8 * 4096
    c = n // 8
    # closed form: rank i work = c^2 i + c(c+1)/2
    assert cp.causal_work(8, n, "contiguous") == [c * c * i + c * (c + 1) // 2 for i in range(8)]
    assert cp.imbalance(8, n, "contiguous") == pytest.approx(1.875, abs=1e-3)
    assert cp.imbalance(2, 2 * 4096, "contiguous") == pytest.approx(1.5, abs=1e-3)


def test_varlen_zigzag_work_balanced():
    cu = [0, 8, 24, 32]
    assert cp.imbalance(2, 32, "zigzag", cu) == 1.0
    assert cp.imbalance(2, 32, "contiguous", cu) > 1.0
