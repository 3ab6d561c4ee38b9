"""S2 head placement under Ulysses / USP (issue 22 item 7; seqpar/cp/s2_heads.py), on one process:
the per-head block counts equal the kernel's plan, the balanced placement beats the contiguous split
at the shapes of the spawned equivalence cases (``*s2-*-placed*`` in tests/test_cp_attention.py and
test_cp_varlen.py, so those exercise a real permutation), the per-run kernel calls equal the full call's heads (outputs and
gradients), and bad options fail naming the field before anything moves."""

from __future__ import annotations

import pytest
import torch

from seqpar import cp
from seqpar.cp.s2_heads import head_placement, kv_head_blocks, s2_runs_forward
from seqpar.kernels import S2Layout, s2_attention
from seqpar.kernels.s2.api import s2_stats
from test_cp_attention import PLACED


def _part(n, world, docs=None, balance="zigzag"):
    cu = None if docs is None else torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    return cp.make_partition(n, (0, world), balance=balance, cu_seqlens=cu)


@pytest.mark.parametrize("docs", [None, [40, 5, 38]])
def test_head_blocks_are_the_kernels_tiles(docs):
    n = 83 if docs is None else sum(docs)
    lay = PLACED.with_heads(8)
    blocks = kv_head_blocks(_part(n, 2, docs), lay, 8)
    assert sum(blocks) == s2_stats(PLACED, n, 8, 8, cu_seqlens=None if docs is None else
                                   [0, *torch.tensor(docs).cumsum(0).tolist()])["computed_blocks"]
    assert blocks[6] == blocks[7] > max(blocks[:6])  # the two dense heads read every causal block
    # a TP slice (global kv heads 2..5 of 8) counts the same heads of the full model
    assert kv_head_blocks(_part(n, 2, docs), lay, 4, 2, 8) == blocks[2:6]


@pytest.mark.parametrize("world, heads, kv_heads, n, docs, degree", [
    (2, 8, 8, 2 * 2 * 8 + 5, None, 2), (4, 8, 8, 2 * 4 * 8 + 5, None, 4),
    (2, 8, 4, 2 * 2 * 8 + 5, None, 2), (4, 8, 4, 2 * 4 * 8 + 5, None, 2),  # usp, degree 2
    (2, 8, 8, 83, [40, 5, 38], 2), (4, 8, 8, 83, [40, 5, 38], 4), (4, 8, 4, 83, [40, 5, 38], 2),
])
def test_balanced_placement_beats_contiguous_where_the_spawned_cases_run_it(world, heads, kv_heads, n, docs, degree):
    layout = PLACED.with_heads(heads)
    part = _part(n, world, docs, "contiguous" if (kv_heads == 4 and docs is None) else "zigzag")
    hp = head_placement(part, layout, heads=heads, kv_heads=kv_heads, degree=degree)
    assert not hp.identity and max(hp.blocks) < max(hp.contiguous_blocks)
    assert sorted(hp.order) == list(range(kv_heads)) and {len(g) for g in hp.kv_heads} == {kv_heads // degree}
    cost = kv_head_blocks(part, layout, kv_heads)
    assert hp.blocks == tuple(sum(cost[g] for g in gs) * (heads // kv_heads) for gs in hp.kv_heads)
    assert sum(hp.blocks) == sum(hp.contiguous_blocks)
    # the dense heads (the last 1-2 kv heads) land on different members
    dense = kv_heads - (layout.num_dense_heads)
    owners = [u for u, gs in enumerate(hp.kv_heads) for g in gs if g >= dense]
    assert len(set(owners)) == len(owners)
    assert head_placement(part, layout, heads=heads, kv_heads=kv_heads, degree=degree,
                          placement="contiguous").identity


def test_placement_falls_back_to_contiguous_when_nothing_is_gained():
    part = _part(64, 2)
    homo = S2Layout(block_size=16, local_blocks=1, vert_stride=4, homo_head=True)  # every head the same blocks
    assert head_placement(part, homo, heads=4, kv_heads=4, degree=2).identity
    one = head_placement(part, PLACED.with_heads(4), heads=4, kv_heads=2, degree=2)  # one kv head each
    assert one.identity and one.blocks == one.contiguous_blocks
    rep = head_placement(_part(64, 4), PLACED.with_heads(4), heads=4, kv_heads=2, degree=4)  # replicated kv heads
    assert rep.identity and rep.kv_heads == ((0,), (0,), (1,), (1,))


def test_runs_equal_the_full_calls_heads():
    """One kernel call per run of consecutive global kv heads == those heads of the full call."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 37, h, 16, generator=g) for h in (8, 4, 4))
    layout = S2Layout(block_size=16, local_blocks=1, vert_stride=4, num_dense_heads=1).with_heads(8)
    heads = (0, 2, 3)  # runs (0, 0, 1), (1, 2, 2)
    qi = torch.tensor([h * 2 + i for h in heads for i in range(2)])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    full = s2_attention(*leaves, layout, backend="torch")
    sub = [t.detach().clone().requires_grad_() for t in (q[:, :, qi], k[:, :, list(heads)], v[:, :, list(heads)])]
    runs = ((0, 0, 1), (1, 2, 2))
    o = s2_runs_forward(*sub, runs, 4, layout=layout, backend="torch")
    torch.testing.assert_close(o, full[:, :, qi])
    go = torch.randn_like(o)
    (o * go).sum().backward()
    full.backward(torch.zeros_like(full).index_copy(2, qi, go))
    torch.testing.assert_close(sub[0].grad, leaves[0].grad[:, :, qi])
    torch.testing.assert_close(sub[1].grad, leaves[1].grad[:, :, list(heads)])


@pytest.mark.parametrize("scheme, value, match", [
    ("allgather", "balanced", "head_placement chooses the heads of each rank under scheme='ulysses' or 'usp'"),
    ("ring", "contiguous", "head_placement chooses the heads of each rank"),
    ("ulysses", "zigzag", r"head_placement must be one of \('balanced', 'contiguous'\), got 'zigzag'"),
])
def test_head_placement_option_is_validated(scheme, value, match):
    q = torch.zeros(1, 16, 4, 16)
    k = torch.zeros(1, 16, 2, 16)
    with pytest.raises(ValueError, match=match):
        cp.attention(q, k, k, kind="s2", scheme=scheme, group=(0, 2), layout=PLACED, head_placement=value)
    with pytest.raises(ValueError, match="unexpected keyword"):
        cp.attention(q, k, k, kind="softmax", scheme="ulysses", group=(0, 2), head_placement="balanced")


# ---- key-block ownership by stride residue (balance="stride") ------------------------------------
STRIDE8 = S2Layout(block_size=16, local_blocks=3, vert_stride=8, num_dense_heads=1)


@pytest.mark.parametrize("world", [2, 4])
def test_stride_ownership_puts_each_heads_columns_on_one_rank(world):
    """Whole blocks round robin inside every document (continuing across documents), so with
    P | vert_stride every sparse kv head's stride columns of a document sit on one rank."""
    docs = [100, 37, 260, 16]
    lay = STRIDE8.with_heads(8)
    part = cp.make_partition(sum(docs), (0, world), balance="stride", block_size=16,
                             cu_seqlens=[0, *torch.tensor(docs).cumsum(0).tolist()])
    owner: dict[tuple[int, int], int] = {}
    for r, ps in enumerate(part.pieces):
        for p in ps:
            assert p.pos % 16 == 0 and (p.length == 16 or p.end == docs[p.doc]), p  # whole blocks
            owner[(p.doc, p.pos // 16)] = r
    first = 0
    for d, n in enumerate(docs):
        nb = -(-n // 16)
        assert [owner[(d, j)] for j in range(nb)] == [(first + j) % world for j in range(nb)]
        first += nb
        column = lay.kv_block_mask(4, torch.tensor([nb + 8]), torch.arange(nb))[:, 0, :]
        for g in range(3):  # the sparse kv heads
            assert len({owner[(d, j)] for j in column[g].nonzero().flatten().tolist()}) <= 1
    blocks = [len(ps) for ps in part.pieces]  # the round robin: block counts differ by at most one
    assert max(blocks) - min(blocks) <= 1 and sum(blocks) == first


def _closed_form_rows(world: int, nb: int, bs: int, band: int, residues: list, dense: int, r: int) -> int:
    """docs/cp.md's count for one sequence of ``nb = m·P`` whole blocks: rank r's query blocks are
    ``i ≡ r (mod P)``, the last one ``r + (m-1)P``; of the remote blocks before it (``j mod P != r``)
    it receives, per sparse kv head, those whose distance ``(r - j) mod P`` to the next query block
    is within the window (``< local_blocks``) and the stride columns of the head when its column
    residue's owner is no such rank; a dense head, every remote block."""
    last = r + (nb // world - 1) * world
    near = {(r - k) % world for k in range(1, band)} - {r}
    remote = [j for j in range(last) if j % world != r]
    window = sum(1 for j in remote if j % world in near)
    rows = 0
    for a in residues:  # column residue mod vert_stride of each sparse kv head
        rows += window + sum(1 for j in remote if j % STRIDE8.vert_stride == a and j % world not in near)
    return (rows + dense * len(remote)) * bs


@pytest.mark.parametrize("world", [2, 4])
def test_stride_exchange_rows_follow_the_closed_form_and_exceed_zigzag(world):
    """The exchange's exact per-rank rows under stride ownership equal the closed form of docs/cp.md,
    every rank receives about the same, and the busiest rank receives more than under zigzag (the
    window halo of every query block is remote): the honest finding of the bench."""
    from seqpar.cp.s2_exchange import exchange_rows

    nb, hkv = 8 * world, 4
    lay = STRIDE8.with_heads(8)
    stride = cp.make_partition(nb * 16, (0, world), balance="stride", block_size=16)
    rows = [sum(x) for x in exchange_rows(stride, lay, hkv)]
    column = lay.kv_block_mask(hkv, torch.tensor([nb + 8]), torch.arange(8))[:, 0, :]
    residues = [int(column[g].nonzero()[0]) for g in range(hkv - 1)]
    assert rows == [_closed_form_rows(world, nb, 16, 3, residues, 1, r) for r in range(world)]
    zigzag = [sum(x) for x in exchange_rows(cp.make_partition(nb * 16, (0, world)), lay, hkv)]
    assert max(rows) > max(zigzag)
    # cp.predict (parallel.cp_schemes: auto's model) prices the placement from the layout's block too
    shape = dict(world=world, seq_len=nb * 16, heads=8, kv_heads=hkv, head_dim=16, layout=STRIDE8)
    assert cp.predict("s2", "allgather", balance="stride", **shape).bytes > cp.predict("s2", "allgather", **shape).bytes


def test_stride_balance_needs_its_block_size_and_names_it():
    with pytest.raises(ValueError, match="block_size"):
        cp.make_partition(40, (0, 2), balance="stride")
    with pytest.raises(ValueError, match="block_size= is the block of balance='stride'"):
        cp.make_partition(40, (0, 2), block_size=16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        cp.make_partition(40, (0, 2), balance="stride", block_size=0)
    # 33 tokens in blocks of 16: rank 0 holds blocks 0 and 2 (17 tokens), more than ceil(33 / 2)
    part = cp.make_partition(33, (0, 2), balance="stride", block_size=16)
    assert part.local_len == 17 and part.pad_per_rank == (0, 1)
    x = torch.arange(33.0)[None, :]
    assert torch.equal(cp.shard(x, (0, 2), balance="stride", block_size=16), torch.cat([x[:, :16], x[:, 32:]], 1))
    assert torch.equal(cp.shard(x, (1, 2), balance="stride", block_size=16), torch.cat([x[:, 16:32], x[:, :1] * 0], 1))
    with pytest.raises(ValueError, match=r"at least 17 \(balance='stride'"):
        cp.make_partition(33, (0, 2), balance="stride", block_size=16, local_len=16)
    # a kind without blocks cannot take the block from a layout: partition= or an error naming it
    q = torch.zeros(1, 20, 2, 16)
    with pytest.raises(ValueError, match="block_size"):
        cp.attention(q, q, q, kind="softmax", group=(0, 2), balance="stride")
    # kind='s2' takes the block from its layout: 34 tokens in blocks of 16 put 18 on rank 0 (> 17)
    with pytest.raises(ValueError, match=r"at least 18 \(balance='stride'"):
        cp.attention(q[:, :17], q[:, :17], q[:, :17], kind="s2", group=(0, 2), balance="stride", seq_len=34,
                     layout=STRIDE8)
