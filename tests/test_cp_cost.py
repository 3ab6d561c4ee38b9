"""The joint cost balancer (issue 22 item 4): ``balance="cost"`` with a :class:`cp.CostModel` of the
whole model. The modelled per-token work equals a brute-force count of the (query, key) pairs each
kind computes; on packed documents of mixed lengths with S2 + softmax layers zigzag's modelled
imbalance is > 1.2 and the cost balancer's <= 1.05; every scheme on the cost partition equals the
single-rank op (outputs and every gradient, fp64 reference, P = 2 and 4, GQA, a length that is no
multiple of P), with the ledger equal to ``cp.scheme_cost(partition=...)`` (:func:`cost_cases`, run
inside tests/test_cp_varlen.py's multi-rank spawn); bad input raises one clear ValueError."""

from __future__ import annotations

import pytest
import torch

from seqpar import cp
from seqpar.kernels import S2Layout
from test_cp_attention import _case

S2 = S2Layout(block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=1)
DOCS = {2: [3, 4, 10, 6], 4: [3, 18, 14, 15, 9, 10]}  # 23 and 69 tokens: 1 and 3 padding slots


def _model(layout: S2Layout = S2) -> cp.CostModel:
    return cp.CostModel(layers={"s2": 3, "softmax": 1}, heads=4, kv_heads=2, s2_layout=layout)


def _cu(docs: list[int]) -> list[int]:
    return [0, *torch.tensor(docs).cumsum(0).tolist()]


@pytest.mark.parametrize("layout", [
    S2, S2Layout(block_size=16, local_blocks=1, vert_stride=3, head_sliding_offset=1),
    S2Layout(block_size=16, local_blocks=3, vert_stride=4, homo_head=True),
    S2Layout(block_size=16, local_blocks=1, vert_stride=2, head_sliding_step=1, num_dense_heads=2)])
def test_token_costs_count_the_pairs_each_kind_computes(layout):
    n, heads, kvh = 87, 4, 2
    model = cp.CostModel(layers={"s2": 1}, heads=heads, kv_heads=kvh, s2_layout=layout)
    t = torch.arange(n)
    blocks = layout.kv_block_mask(kvh, t // 16, t // 16, num_heads=heads)  # [kvh, n, n] per token pair
    pairs = (blocks & (t[None, :] <= t[:, None])).sum(-1).double().mean(0)  # keys per token, mean over heads
    assert torch.equal(model.token_costs(n), pairs)
    mixed = cp.CostModel(layers=[("softmax", 2), ("lightning", 1), ("moh", 1)], moh_active=0.5, linear_cost=10.0)
    assert torch.equal(mixed.token_costs(n, real_len=80),
                       torch.where(t < 80, 2 * (t + 1) + 10 + 0.5 * (t + 1), 0).double())
    full = cp.CostModel(layers={"softmax": 1}, causal=False)
    assert torch.equal(full.token_costs(5, real_len=3), torch.tensor([3.0, 3, 3, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("world", [2, 4])
def test_cost_balancer_beats_zigzag_on_mixed_documents(world):
    docs, model = DOCS[world], _model()
    n = sum(docs)
    zz = cp.make_partition(n, (0, world), cu_seqlens=_cu(docs))
    part = cp.make_partition(n, (0, world), balance="cost", cost=model, cu_seqlens=_cu(docs))
    assert part is cp.make_partition(n, (0, world), balance="cost", cost=_model(), cu_seqlens=_cu(docs))  # cached
    assert part.balance == "cost" and part.local_len == zz.local_len and part.padding == zz.padding
    # every real token on exactly one rank, every rank's buffer filled
    idx = torch.cat([part.token_index(r) for r in range(world)])
    assert sorted(idx[idx >= 0].tolist()) == list(range(n))
    assert sum(p.length for ps in part.pieces for p in ps) == n
    # modelled work: zigzag over-loads some ranks, the cost balancer does not
    assert model.imbalance(zz) > (1.2 if world == 4 else 1.15), model.rank_costs(zz)
    assert model.imbalance(part) <= 1.05, model.rank_costs(part)
    # and on random packings (documents of 1..80 tokens, at least 24 tokens per rank: balance is
    # token-granular, so a few tokens per rank cannot be balanced by any placement)
    g = torch.Generator().manual_seed(world)
    for _ in range(30):
        docs = (torch.rand(int(torch.randint(2, 6, (1,), generator=g)), generator=g) * 80 + 1).long().tolist()
        docs.append(max(1, 24 * world - sum(docs)))
        p = cp.make_partition(sum(docs), (0, world), balance="cost", cost=model, cu_seqlens=_cu(docs))
        assert model.imbalance(p) <= 1.05, (docs, model.rank_costs(p))
    assert sum(model.rank_costs(part)) == pytest.approx(sum(model.rank_costs(zz)))
    # where zigzag already meets the target it is kept (Megatron's layout, fewest pieces)
    even = cp.make_partition(4 * world * 16, (0, world), balance="cost", cost=cp.CostModel(layers={"softmax": 1}))
    assert even.pieces == cp.make_partition(4 * world * 16, (0, world)).pieces


def test_cost_balance_bad_input():
    with pytest.raises(ValueError, match="balance='cost' needs the model's cost model"):
        cp.make_partition(32, (0, 2), balance="cost")
    with pytest.raises(ValueError, match="cost= is the cost model of balance='cost'"):
        cp.make_partition(32, (0, 2), cost=_model())
    with pytest.raises(ValueError, match="cost must be a seqpar.cp.CostModel"):
        cp.make_partition(32, (0, 2), balance="cost", cost={"softmax": 1})
    q = torch.zeros(1, 16, 2, 8)
    with pytest.raises(ValueError, match="pass partition= to every cp.attention call"):
        cp.attention(q, q, q, kind="softmax", scheme="ring", group=(0, 2), balance="cost")
    with pytest.raises(ValueError, match="balance='cost' needs"):
        cp.scheme_cost("softmax", "ring", world=2, seq_len=32, heads=2, kv_heads=2, head_dim=8, balance="cost")
    with pytest.raises(ValueError, match="fixed-order balancers"):
        cp.chunk_ids(0, 2, "cost")
    with pytest.raises(ValueError, match="needs s2_layout"):
        cp.CostModel(layers={"s2": 1})
    with pytest.raises(ValueError, match="kind must be one of"):
        cp.CostModel(layers={"mamba": 1})
    with pytest.raises(ValueError, match=r"layers\['softmax'\] must be a layer count"):
        cp.CostModel(layers={"softmax": 1.5})
    with pytest.raises(ValueError, match="counts no layer"):
        cp.CostModel(layers={"softmax": 0})
    with pytest.raises(ValueError, match="moh_active is a fraction"):
        cp.CostModel(layers={"moh": 1}, moh_active=2)
    with pytest.raises(ValueError, match="target is a max / mean ratio"):
        cp.CostModel(layers={"softmax": 1}, target=0.9)
    with pytest.raises(ValueError, match="kv_heads .3. must divide heads .4."):
        cp.CostModel(layers={"softmax": 1}, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="num_dense_heads"):
        cp.CostModel(layers={"s2": 1}, heads=4, kv_heads=1, s2_layout=S2Layout(num_dense_heads=2))


def cost_cases(world: int) -> list[dict]:
    """Cases on the cost-balanced partition; they ride along tests/test_cp_varlen.py's spawn (one per world)."""
    docs, model = DOCS[world], _model()
    n = sum(docs)
    common = dict(b=1, n=n, doc_lens=docs, cost=model)
    out = [_case(f"cost-{kind}-{scheme}", kind, scheme, "cost", world, h=4, hkv=2, d=16, seed=300 + i,
                 **({"layout": S2} if kind == "s2" else {}), **common)
           for i, (kind, scheme) in enumerate((k, s) for k in ("s2", "softmax") for s in ("allgather", "ring"))]
    out += [
        _case("cost-s2-usp", "s2", "usp", "cost", world, h=4, hkv=2, d=16, layout=S2, ulysses_degree=2, seed=310,
              **common),
        _case("cost-softmax-ulysses", "softmax", "ulysses", "cost", world, h=4, hkv=1, d=16, seed=311, **common),
        _case("cost-lightning-allgather", "lightning", "allgather", "cost", world, h=2, hkv=2, d=16, dv=8,
              with_state=True, seed=312, **common),
        _case("cost-moh-ring", "moh", "ring", "cost", world, h=4, hkv=2, d=16, seed=313, **common),
    ]
    if world == 4:  # test time: the token-sharded schemes the balancer is for, and usp's ring
        out = [c for c in out if c["name"] in ("cost-s2-allgather", "cost-s2-ring", "cost-softmax-ring", "cost-s2-usp")]
    return out


def test_token_costs_of_a_sliding_window():
    """A windowed softmax token costs the keys its window holds (the reference mask's row count,
    documents restarting), so the balancer sees the saturated cost, not the causal ramp."""
    from seqpar.kernels.s2.reference import token_mask

    cu = torch.tensor([0, 9, 50], dtype=torch.int32)
    mask = token_mask(1, 1, 50, 50, layout=None, causal=True, q_offset=0, k_offset=0, cu_seqlens=cu, window=7)
    model = cp.CostModel(layers={"softmax": 2, "lightning": 1}, linear_cost=3.0, softmax_window=7)
    got = torch.cat([model.token_costs(9), model.token_costs(41)])
    assert torch.equal(got, 2 * mask[0].sum(-1).double() + 3)
    with pytest.raises(ValueError, match="CostModel.softmax_window"):
        cp.CostModel(layers={"softmax": 1}, softmax_window=0)
    with pytest.raises(ValueError, match="causal=True"):
        cp.CostModel(layers={"softmax": 1}, softmax_window=4, causal=False)
