"""Packed documents of any length and sequences of any length under every kind x scheme (issue 22
items 1-2), against the single-rank op (outputs and every gradient, fp64 reference; P = 2 and 4;
GQA): documents shorter than one chunk and not multiples of 2P, sequence lengths that are not
multiples of P (padding slots: output 0, gradient 0), contiguous and zigzag. The ledger equals
``cp.scheme_cost`` per rank, and a ring hop that holds nothing the receiver needs moves nothing.
The cases run through the helpers of tests/test_cp_attention.py (one spawn per world), with the cost
balancer's cases of tests/test_cp_cost.py."""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.cp.ring import plan
from seqpar.kernels import S2Layout
from test_cp_attention import PLACED, _case, _cp_job, run_and_check
from test_cp_cost import DOCS as COST_DOCS
from test_cp_cost import cost_cases

S2 = S2Layout(block_size=16, local_blocks=2, vert_stride=3, num_dense_heads=1)
S2_STRIDE = S2Layout(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)  # P | vert_stride


def _docs(world: int) -> list[int]:
    # documents shorter than one chunk (1, 2 and 3 tokens), none a multiple of 2P, and a total that
    # is no multiple of P (padding slots too)
    return [3, 2 * world + 1, 1, 6 * world - 1, 1 if world == 2 else 2]


def _cases(world: int) -> list[dict]:
    """Every kind x scheme with documents at P = 2 and 4; without documents (any length, batch 2,
    full attention) at P = 2 only (test time; the Triton MoH varlen kernel: tests/test_moh_kernel.py)."""
    p, docs = world, _docs(world)
    n = sum(docs)
    s2_docs = [40, 5, 38]  # pieces are not whole blocks, blocks restart in every document
    uly = {"ulysses_degree": 2}
    out = []
    for kind in ("softmax", "moh"):
        out += [
            _case(f"v-{kind}-ag-docs", kind, "allgather", "zigzag", p, b=1, n=n, h=4, hkv=2, d=16, doc_lens=docs,
                  seed=101),
            _case(f"v-{kind}-ring-docs", kind, "ring", "zigzag", p, b=1, n=n, h=3, hkv=1, d=16, doc_lens=docs,
                  seed=102),
            _case(f"v-{kind}-uly-docs", kind, "ulysses", "zigzag", p, b=1, n=n, h=4, hkv=2, d=16, doc_lens=docs,
                  seed=103),
            _case(f"v-{kind}-usp-docs", kind, "usp", "zigzag", p, b=1, n=n, h=4, hkv=1, d=16, doc_lens=docs,
                  seed=104, **uly),
        ]
    out += [  # any length, no documents: N not a multiple of P, batch 2, full (non-causal) attention
        _case("v-softmax-ring-odd-full", "softmax", "ring", "zigzag", p, b=2, n=4 * p + 3, h=2, hkv=2, d=16,
              causal=False, seed=105),
        _case("v-moh-uly-odd-full", "moh", "ulysses", "contiguous", p, b=2, n=4 * p + 1, h=4, hkv=4, d=16,
              causal=False, seed=106),
    ]
    out += [
        _case("v-softmax-ring-contig-docs", "softmax", "ring", "contiguous", p, b=1, n=n, h=2, hkv=1, d=16,
              doc_lens=docs, seed=107),
        _case("v-s2-ag-docs", "s2", "allgather", "zigzag", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16,
              doc_lens=s2_docs, layout=S2, seed=110),
        _case("v-s2-ring-docs", "s2", "ring", "zigzag", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16, doc_lens=s2_docs,
              layout=S2, seed=111),
        _case("v-s2-uly-docs", "s2", "ulysses", "zigzag", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16,
              doc_lens=s2_docs, layout=S2, seed=112),
        _case("v-s2-usp-docs", "s2", "usp", "zigzag", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16, doc_lens=s2_docs,
              layout=S2, seed=113, **uly),
        # S2 head placement with documents: kv heads balanced by their blocks over the documents
        _case("v-s2-uly-docs-placed", "s2", "ulysses", "zigzag", p, b=1, n=sum(s2_docs), h=8, hkv=8, d=16,
              doc_lens=s2_docs, layout=PLACED, seed=116),
        _case("v-s2-usp-docs-placed-gqa", "s2", "usp", "zigzag", p, b=1, n=sum(s2_docs), h=8, hkv=4, d=16,
              doc_lens=s2_docs, layout=PLACED, seed=117, **uly),
        _case("v-s2-ag-odd", "s2", "allgather", "zigzag", p, b=2, n=2 * p * 16 + 5, h=2, hkv=1, d=16, layout=S2,
              seed=114),
        _case("v-s2-ring-contig-odd", "s2", "ring", "contiguous", p, b=1, n=p * 16 + 3, h=2, hkv=2, d=16, layout=S2,
              seed=115),
    ]
    for scheme, extra in (("allgather", {}), ("ring", {}), ("ulysses", {}), ("usp", uly)):
        out.append(_case(f"v-lightning-{scheme}-docs", "lightning", scheme, "zigzag", p, b=1, n=n, h=4, hkv=2,
                         d=16, dv=8, doc_lens=docs, with_state=True, seed=120, **extra))
    out += [
        _case("v-lightning-ring-odd", "lightning", "ring", "zigzag", p, b=2, n=4 * p + 3, h=2, hkv=1, d=16,
              with_state=True, seed=121),
        _case("v-lightning-allgather-contig-docs", "lightning", "allgather", "contiguous", p, b=1, n=n, h=2, hkv=2,
              d=16, doc_lens=docs, with_state=True, seed=122),
        _case("v-lightning-usp-odd", "lightning", "usp", "zigzag", p, b=2, n=4 * p + 2, h=4, hkv=2, d=16,
              with_state=True, seed=123, **uly),
    ]
    # sliding-window softmax on the documents, every scheme: a window below the smallest chunk and
    # one above the longest document's chunk (the ring skips whole hops / key pieces outside it)
    for i, (scheme, extra) in enumerate((("allgather", {}), ("ring", {}), ("ulysses", {}), ("usp", uly))):
        for j, win in enumerate((2, 2 * p + 3)):
            out.append(_case(f"v-softmax-{scheme}-win{win}-docs", "softmax", scheme, "zigzag", p, b=1, n=n, h=4,
                             hkv=2 if scheme != "usp" else 1, d=16, doc_lens=docs, window=win,
                             seed=130 + 2 * i + j, **extra))
    out.append(_case("v-softmax-ring-contig-win-docs", "softmax", "ring", "contiguous", p, b=1, n=n, h=2, hkv=1,
                     d=16, doc_lens=docs, window=3, seed=140))
    # allgather moves only the halo, also on contiguous documents and on the cost balancer's partition
    out.append(_case("v-softmax-allgather-contig-win-docs", "softmax", "allgather", "contiguous", p, b=1, n=n, h=2,
                     hkv=1, d=16, doc_lens=docs, window=3, seed=141))
    out.append(_case("cost-softmax-allgather-win", "softmax", "allgather", "cost", p, b=1, n=sum(COST_DOCS[p]), h=4,
                     hkv=2, d=16, doc_lens=COST_DOCS[p], window=4, seed=142,
                     cost=cp.CostModel(layers={"softmax": 1, "lightning": 1}, softmax_window=4)))
    # balance="stride" with documents: blocks restart in every document (the round robin continues
    # across them); S2 takes the block from its layout, the others get the partition
    out += [
        _case("v-s2-ag-stride-docs", "s2", "allgather", "stride", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16,
              doc_lens=s2_docs, layout=S2_STRIDE, seed=150),
        _case("v-s2-ring-stride-docs", "s2", "ring", "stride", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16,
              doc_lens=s2_docs, layout=S2_STRIDE, seed=151),
        _case("v-s2-usp-stride-docs", "s2", "usp", "stride", p, b=1, n=sum(s2_docs), h=4, hkv=2, d=16,
              doc_lens=s2_docs, layout=S2_STRIDE, seed=152, **uly),
        _case("v-lightning-ring-stride-docs", "lightning", "ring", "stride", p, b=1, n=n, h=2, hkv=2, d=16,
              doc_lens=docs, with_state=True, block_size=2, seed=153),
        _case("v-softmax-uly-stride-docs", "softmax", "ulysses", "stride", p, b=1, n=n, h=4, hkv=2, d=16,
              doc_lens=docs, block_size=2, seed=154),
        # allgather's window halo on the round robin of blocks (every block's halo is another rank's)
        _case("v-softmax-ag-stride-win-docs", "softmax", "allgather", "stride", p, b=1, n=n, h=4, hkv=2, d=16,
              doc_lens=docs, block_size=2, window=3, seed=155),
    ]
    only_p2 = ("-odd",)
    out = [c for c in out if world == 2 or not any(tag in c["name"] for tag in only_p2)]
    return out + cost_cases(world)  # the joint cost balancer's partition (tests/test_cp_cost.py)


def _varlen_job(rank: int, world: int, cases: list[dict]) -> dict:
    out = _cp_job(rank, world, cases)
    if world == 2:  # one spawn: the hop and custom-balancer checks ride along
        out["hops"] = _hop_job(rank, world)
        out["custom"] = _custom_balancer_job(rank, world)
    return out


def _custom_balancer_job(rank: int, world: int) -> list[str]:
    """A balancer is only a different partition: rank 0 holds the sequence's *second* half and rank 1
    its first (a layout no built-in balancer makes, documents split unevenly), and every scheme on
    it equals the single-rank op."""
    from seqpar.cp.partition import Partition
    from seqpar.kernels import flash_attention, lightning_attention, s2_attention

    lens, n = [7, 20, 5], 32
    cu = torch.tensor([0, 7, 27, 32], dtype=torch.int32)
    runs = [[(16, 11, 1, 9), (27, 5, 2, 0)], [(0, 7, 0, 0), (7, 9, 1, 0)]]
    part = Partition.from_runs(2, n, 16, runs, (0, 7, 27, 32), lens, balance="halves-swapped", varlen=True)
    g = torch.Generator().manual_seed(9)
    full = [torch.randn(1, n, 2, 16, generator=g) * 0.5 for _ in range(3)]
    slope, layout = torch.tensor([0.2, 0.9]), S2Layout(block_size=16, local_blocks=1, vert_stride=2)
    refs = {"softmax": flash_attention(*full, cu_seqlens=cu, backend="torch"),
            "s2": s2_attention(*full, layout, cu_seqlens=cu, backend="torch"),
            "lightning": lightning_attention(*full, slope, cu_seqlens=cu, backend="torch")[0],
            "softmax-win": flash_attention(*full, cu_seqlens=cu, window=5, backend="torch")}
    bad = []
    for kind, scheme in (("softmax", "ring"), ("softmax", "ulysses"), ("s2", "allgather"), ("s2", "ring"),
                         ("lightning", "allgather"), ("lightning", "ring"), ("lightning", "usp"),
                         ("softmax-win", "allgather"), ("softmax-win", "ring")):
        kw = {"slope": slope} if kind == "lightning" else {"layout": layout} if kind == "s2" else {}
        if kind == "softmax-win":  # the halo of a window across the swapped halves
            kind, kw = "softmax", {"window": 5}
        if scheme == "usp":
            kw["ulysses_degree"] = 2
        o = cp.attention(*(part.shard(t, rank) for t in full), kind=kind, scheme=scheme, partition=part,
                         backend="torch", **kw)
        o = o[0] if kind == "lightning" else o
        ref = refs["softmax-win" if kw.get("window") else kind]
        if not torch.allclose(o, part.shard(ref, rank), rtol=1e-5, atol=1e-6):
            bad.append(f"{kind} x {scheme}{' window' if kw.get('window') else ''}")
    return bad + _stride_padded_docs(rank)


def _stride_padded_docs(rank: int) -> list[str]:
    """balance="stride" on Megatron's padded documents (cu_seqlens padded, cu_seqlens_unpadded real):
    the pads fill the ranks with fewer real blocks; outputs at real tokens equal the op on the real
    tokens alone, pads output 0 and pass no gradient to k / v."""
    from seqpar.kernels import flash_attention, s2_attention

    real, padded = [0, 37, 40, 75], [0, 48, 56, 96]  # documents of 37, 3 and 35 real tokens
    cu, cu_real = (torch.tensor(c, dtype=torch.int32) for c in (padded, real))
    keep = torch.cat([torch.arange(a, a + n) for a, n in zip(padded[:-1], [37, 3, 35])])
    g = torch.Generator().manual_seed(11)
    full = [torch.randn(1, 96, 2, 16, generator=g) for _ in range(3)]
    layout = S2Layout(block_size=16, local_blocks=1, vert_stride=2)
    part = cp.make_partition(96, (rank, 2), balance="stride", block_size=16, cu_seqlens=cu, cu_seqlens_unpadded=cu_real)
    dense = [t[:, keep] for t in full]
    refs = {"s2": s2_attention(*dense, layout, cu_seqlens=cu_real, backend="torch"),
            "softmax": flash_attention(*dense, cu_seqlens=cu_real, backend="torch"),
            "softmax-win": flash_attention(*dense, cu_seqlens=cu_real, window=6, backend="torch")}
    bad = []
    for kind, scheme in (("s2", "allgather"), ("s2", "ring"), ("softmax", "ulysses"), ("softmax-win", "allgather")):
        q, k, v = (part.shard(t, rank).requires_grad_() for t in full)
        kw = {"layout": layout} if kind == "s2" else {"window": 6} if kind == "softmax-win" else {}
        o = cp.attention(q, k, v, kind=kind.split("-")[0], scheme=scheme, partition=part, backend="torch", **kw)
        want = torch.zeros(1, 96, 2, 16)
        want[:, keep] = refs[kind]
        valid = part.valid(rank)
        o.sum().backward()
        if not (torch.allclose(o, part.shard(want, rank), rtol=1e-5, atol=1e-6) and not o[:, ~valid].any()
                and not q.grad[:, ~valid].any()):
            bad.append(f"stride padded docs: {kind} x {scheme}")
    return bad


@pytest.mark.parametrize("world", [2, 4])
def test_varlen_and_any_length_match_single_rank(world):
    results = run_and_check(_cases(world), world, timeout=600, job=_varlen_job)
    # the contiguous ring with documents: a rank receives only from ranks holding earlier tokens of
    # its own documents; hops with nothing it needs post no transfer (ledger calls == the plan's)
    name = "v-softmax-ring-contig-docs"
    part = cp.make_partition(sum(_docs(world)), (0, world), balance="contiguous",
                             cu_seqlens=[0, *torch.tensor(_docs(world)).cumsum(0).tolist()])
    for rank, r in enumerate(results):
        steps = plan(part, rank, True)[1:]
        assert r[name]["fwd"].get("send_recv", {}).get("calls", 0) == sum(1 for s in steps if s.recv_rows)
    assert results[0][name]["fwd"] == {}  # rank 0 holds the first tokens: it receives nothing
    # documents that start at rank boundaries: the ring, LASP-2 and LASP-1 move nothing at all
    for r in results if world == 2 else ():
        for pair, (fwd, bwd) in r["hops"].items():
            assert fwd == {} and bwd == {}, (pair, fwd, bwd)
        assert r["custom"] == [], r["custom"]  # a custom balancer's partition runs under every scheme


def _hop_job(rank: int, world: int) -> dict:
    """Documents that start exactly at rank boundaries (contiguous): the ring, LASP-2 and LASP-1 move
    nothing at all, and still equal the single-rank op."""
    from seqpar.kernels import flash_attention, lightning_attention

    n = 4 * world
    cu = torch.tensor(list(range(0, n + 1, 4)), dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(1, n, 2, 8, generator=g) for _ in range(3)]
    part = cp.make_partition(n, None, balance="contiguous", cu_seqlens=cu)
    slope = torch.tensor([0.1, 0.7])
    out = {}
    for kind, scheme in (("softmax", "ring"), ("lightning", "allgather"), ("lightning", "ring")):
        q, k, v = (part.shard(t, rank).requires_grad_() for t in full)
        kw = {"slope": slope} if kind == "lightning" else {}
        with cp.comm_ledger() as fwd:
            o = cp.attention(q, k, v, kind=kind, scheme=scheme, partition=part, backend="torch", **kw)
        o = o[0] if kind == "lightning" else o
        with cp.comm_ledger() as bwd:
            o.sum().backward()
        ref = (flash_attention(*full, cu_seqlens=cu, backend="torch") if kind == "softmax" else
               lightning_attention(*full, slope, cu_seqlens=cu, backend="torch")[0])
        torch.testing.assert_close(o, part.shard(ref, rank), rtol=1e-5, atol=1e-6)
        out[(kind, scheme)] = (fwd.summary(), bwd.summary())
    return out


# ---- megatron-core layers: packed documents reach every kind under every scheme ----------------------
# each kind under two schemes (every scheme's packed path is covered by the matrix above; here the
# layers must hand the documents, the usp degree and the MoH padding mask to cp.attention)
SCHEME_SETS = [
    {"softmax": "ring", "s2": "allgather", "lightning": "ring", "moh": "usp", "usp_ulysses_degree": 2},
    {"softmax": "usp", "s2": "ulysses", "lightning": "allgather", "moh": "ring", "usp_ulysses_degree": 2},
]
MEGA_DOCS = [5, 9, 1, 14]  # 29 tokens: 15 slots per rank at CP=2, one padding slot
MEGA_WINDOW = 4  # below the documents of 5, 9 and 14 tokens and below a rank's 15 slots


def _megatron_packed_job(rank: int, world: int) -> dict:
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    n = sum(MEGA_DOCS)
    cu = torch.tensor([0, *torch.tensor(MEGA_DOCS).cumsum(0).tolist()], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(MEGA_DOCS),
                          max_seqlen_kv=max(MEGA_DOCS))
    out = {}
    try:
        single = {kind: "allgather" for kind in ("softmax", "s2", "lightning", "moh")}
        # the softmax layer runs with a sliding window (on one rank and under CP); "ref-full" without it
        runs = [("ref", single, 1, MEGA_WINDOW), ("ref-full", single, 1, None)]
        for name, schemes, cp_size, window in runs + [(f"cp{i}", s, world, MEGA_WINDOW)
                                                      for i, s in enumerate(SCHEME_SETS)]:
            schemes = dict(schemes)
            degree = schemes.pop("usp_ulysses_degree", 1)
            init_parallel(1, cp_size, seed=7)
            p = replace(preset("tiny"), pattern="ASLH")
            cfg = transformer_config(p, context_parallel_size=cp_size, cp_schemes=schemes, usp_ulysses_degree=degree,
                                     seqpar_backend="torch", s2_block_size=16, s2_local_blocks=1, s2_vert_stride=2,
                                     moh_aux_loss_coef=0.01, params_dtype=torch.float32, softmax_window=window)
            torch.manual_seed(7)
            model = build_gpt(p, cfg, vocab_size=64, max_sequence_length=64)
            g = torch.Generator().manual_seed(11)
            x_full = torch.randn(n, 1, p.hidden_size, generator=g)
            w_full = torch.randn(n, 1, p.hidden_size, generator=g)
            group = parallel_state.get_context_parallel_group() if cp_size > 1 else (0, 1)
            part = cp.make_partition(n, group, cu_seqlens=cu)
            r = rank if cp_size > 1 else 0
            x = part.shard(x_full, r, dim=0).requires_grad_()
            outs = []
            for layer in model.decoder.layers:  # A, S, L, H: each kind's attention module on THD input
                o, _ = layer.self_attention(x, None, packed_seq_params=psp)
                outs.append(o)
            loss = sum((o * part.shard(w_full, r, dim=0)).sum() for o in outs)
            loss.backward()
            grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
            out[name] = {"o": [o.detach() for o in outs], "dx": x.grad, "grads": grads,
                         "index": part.token_index(r)}
            parallel_state.destroy_model_parallel()
    finally:
        disable_cpu_compat()
    return out


def test_megatron_layers_take_packed_documents():
    results = run_ranks(_megatron_packed_job, 2, timeout=600)
    ref = results[0]["ref"]
    # config.softmax_window reaches the softmax (A) layer only: the others equal the full-causal model's
    full = results[0]["ref-full"]["o"]
    assert not torch.allclose(ref["o"][0], full[0], rtol=1e-3, atol=1e-4), "softmax_window changed nothing"
    for layer in range(1, 4):
        torch.testing.assert_close(ref["o"][layer], full[layer], rtol=0, atol=0)
    for i in range(len(SCHEME_SETS)):
        name = f"cp{i}"
        for layer in range(4):
            full = torch.zeros_like(ref["o"][layer])
            for r in results:
                idx = r[name]["index"]
                full[idx[idx >= 0]] = r[name]["o"][layer][idx >= 0]
                assert not r[name]["o"][layer][idx < 0].any()  # the padding slot outputs 0
            torch.testing.assert_close(full, ref["o"][layer], rtol=1e-4, atol=1e-5, msg=f"{name} layer {layer}")
        dx = torch.zeros_like(ref["dx"])
        for r in results:
            idx = r[name]["index"]
            dx[idx[idx >= 0]] = r[name]["dx"][idx >= 0]
        torch.testing.assert_close(dx, ref["dx"], rtol=1e-4, atol=1e-5, msg=f"{name} dx")
        assert ref["grads"].keys() == results[0][name]["grads"].keys()
        for key, want in ref["grads"].items():  # each rank's parameter gradient from its own tokens
            got = sum(r[name]["grads"][key] for r in results)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * (want.abs().max().item() + 1e-12),
                                       msg=f"{name} {key}")


@pytest.mark.parametrize("balance", ["zigzag", "contiguous"])
def test_allgather_window_moves_exactly_the_rows_its_queries_read(balance):
    """allgather + window: rank q receives token j of another rank iff one of q's queries attends to it
    (the reference's token mask: same document, inside the window), at P = 2, 3, 4 with documents,
    padding and windows below / above a chunk; a window of 1 moves nothing (no collective)."""
    from seqpar.cp.allgather import halo_rows, uses_halo, window_rows
    from seqpar.kernels.s2.reference import token_mask

    for world, docs, window in ((2, [3, 9, 1, 12], 4), (3, [40], 6), (4, [5, 2, 30, 6], 9), (4, [17, 20], 1)):
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()])
        part = cp.make_partition(int(cu[-1]), (0, world), balance=balance, cu_seqlens=cu)
        mask = token_mask(1, 1, part.real_len, part.real_len, layout=None, causal=True, q_offset=0, k_offset=0,
                          cu_seqlens=cu, window=window)[0]
        own = part.real_slots // part.local_len
        for q in range(world):
            reads = mask[own == q].any(0) & (own != q)
            assert torch.equal(window_rows(part, window, q), reads.nonzero()[:, 0]), (world, docs, window, q)
            assert list(halo_rows(part, window)[q]) == torch.bincount(own[reads], minlength=world).tolist()
        assert uses_halo(part, window)
        cost = cp.scheme_cost("softmax", "allgather", world=world, seq_len=part.real_len, heads=2, kv_heads=1,
                              head_dim=8, partition=part, window=window, rank=world - 1)
        moved = any(map(any, halo_rows(part, window)))
        assert moved == (window > 1 and not (balance == "contiguous" and world == 2))  # there: docs end at the cut
        row = 1 * (8 + 8) * 2  # kv heads x (d + dv) x bf16 bytes
        want = {"bytes": sum(halo_rows(part, window)[world - 1]) * row, "calls": 1}
        assert cost == ({"fwd": {"all_to_all": want}, "bwd": cost["bwd"]} if moved else {"fwd": {}, "bwd": {}})
