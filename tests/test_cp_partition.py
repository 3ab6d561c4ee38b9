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


def test_shard_errors_name_numbers_and_fix():
    x = torch.zeros(1, 10, 2, 4)
    with pytest.raises(ValueError, match=r"x.shape\[1\] 10 is not divisible by 8 .*world=4.*pad it to 16"):
        cp.shard(x, (0, 4), balance="zigzag")
    with pytest.raises(ValueError, match=r"not divisible by 4 .*pad it to 12"):
        cp.shard(x, (0, 4), balance="contiguous")
    with pytest.raises(ValueError, match="use balance='contiguous'"):
        cp.shard(torch.zeros(1, 6, 1, 1), (0, 2), balance="zigzag")
    with pytest.raises(ValueError, match="balance must be one of"):
        cp.shard(x, (0, 2), balance="striped")
    with pytest.raises(ValueError, match="rank < world"):
        cp.shard(x, (2, 2))
    with pytest.raises(ValueError, match="process group"):
        cp.unshard(x, (0, 2))


def test_varlen_thd_split_and_padding_report():
    world = 2
    lens = [5, 8, 1, 12]
    cu = torch.tensor([0, 5, 13, 14, 26], dtype=torch.int32)
    x = torch.arange(26.).reshape(1, 26, 1, 1)
    with pytest.raises(ValueError, match=r"divisible by 2\*world = 4.*\(0, 5\), \(2, 1\).*pad_varlen"):
        cp.varlen_token_index(cu, 0, world)
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
