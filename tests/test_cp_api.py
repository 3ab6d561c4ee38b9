"""cp.attention validation (errors before any communication, on every rank, no hang) and the
closed forms of cp.scheme_cost against docs/cp.md."""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.kernels import S2Layout


def _bad_calls(group) -> list[tuple[str, dict]]:
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    cu = torch.tensor([0, 3, 16], dtype=torch.int32)
    return [
        (r"scheme='usp' needs ulysses_degree, a positive divisor of the CP world size 2, got 3",
         dict(q=q, k=k, v=v, kind="lightning", scheme="usp", slope=torch.ones(4), ulysses_degree=3)),
        (r"kind must be one of", dict(q=q, k=k, v=v, kind="mamba", scheme="ring")),
        (r"initial_state must have shape \[1, 4, 16, 16\]",
         dict(q=q, k=k, v=v, kind="lightning", scheme="ring", slope=torch.ones(4),
              initial_state=torch.zeros(2, 4, 16, 16))),
        # with documents the states are per document: 2 here
        (r"initial_state must have shape \[2, 4, 16, 16\]",
         dict(q=q, k=k, v=v, kind="lightning", scheme="usp", slope=torch.ones(4), ulysses_degree=2, cu_seqlens=cu,
              initial_state=torch.zeros(1, 4, 16, 16))),
        (r"scheme must be one of", dict(q=q, k=k, v=v, kind="softmax", scheme="tree")),
        (r"the global length 17 does not fit 2 ranks x 8 local tokens \(q.shape\[1\]\).*ceil\(17 / 2\) = 9",
         dict(q=q, k=k, v=v, kind="softmax", scheme="allgather", seq_len=17)),
        (r"seq_len=15 disagrees with cu_seqlens\[-1\] = 16",
         dict(q=q, k=k, v=v, kind="s2", scheme="ring", layout=S2Layout(block_size=16), seq_len=15, cu_seqlens=cu)),
        (r"cu_seqlens \(global, over all ranks\) must be strictly increasing",
         dict(q=q, k=k, v=v, kind="moh", scheme="ring", gates=torch.rand(1, 8, 4),
              cu_seqlens=torch.tensor([0, 3, 3, 16], dtype=torch.int32))),
        (r"needs batch == 1",
         dict(q=q.expand(2, -1, -1, -1), k=k.expand(2, -1, -1, -1), v=v.expand(2, -1, -1, -1), kind="softmax",
              scheme="ulysses", cu_seqlens=cu)),
        (r"cu_seqlens_unpadded: document\(s\) \[0\] have more real tokens than their padded length",
         dict(q=q, k=k, v=v, kind="softmax", scheme="ring", cu_seqlens=cu,
              cu_seqlens_unpadded=torch.tensor([0, 4, 16], dtype=torch.int32))),
        (r"pass either partition= or cu_seqlens",
         dict(q=q, k=k, v=v, kind="softmax", scheme="ring", cu_seqlens=cu, partition=cp.make_partition(16, (0, 2)))),
        (r"the partition is for 4 ranks x 4 local tokens; this call has 2 ranks x 8",
         dict(q=q, k=k, v=v, kind="softmax", scheme="ring", partition=cp.make_partition(16, (0, 4)))),
        (r"balance='contiguous' disagrees with the partition's 'zigzag'",
         dict(q=q, k=k, v=v, kind="softmax", balance="contiguous", partition=cp.make_partition(16, (0, 2)))),
        (r"ulysses needs num_heads \(3\) divisible by the CP world size \(2\)",
         dict(q=q[:, :, :3], k=k[:, :, :1], v=v[:, :, :1], kind="softmax", scheme="ulysses")),
        (r"kind='moh' needs gates \[batch, local seq, heads\]", dict(q=q, k=k, v=v, kind="moh", scheme="ring")),
        (r"unexpected keyword\(s\) \['slope'\] for kind='softmax'",
         dict(q=q, k=k, v=v, kind="softmax", scheme="ring", slope=torch.ones(4))),
        (r"kind='lightning' needs slope as a tensor of shape \[heads\] = \[4\]",
         dict(q=q, k=k, v=v, kind="lightning", scheme="allgather", slope=torch.ones(3))),
        (r"balance must be one of", dict(q=q, k=k, v=v, kind="softmax", balance="striped")),
        (r"num_kv_heads \(3, k.shape\[2\]\) must divide num_heads",
         dict(q=q, k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16), kind="softmax")),
    ]


def _errors_job(rank: int, world: int) -> bool:
    for pattern, kw in _bad_calls(None):
        q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
        with pytest.raises(ValueError, match=pattern):
            cp.attention(q, k, v, group=None, **kw)
    # nothing was left half-sent: a real call still completes on every rank
    q = torch.randn(1, 4, 2, 16)
    o = cp.attention(q, q[:, :, :1], q[:, :, :1], kind="softmax", scheme="ring", backend="torch")
    return bool(torch.isfinite(o).all())


def test_bad_input_raises_on_every_rank_without_hanging():
    assert run_ranks(_errors_job, 2, timeout=120) == [True, True]


def _one_rank_bad_job(rank: int, world: int) -> list[str]:
    # data-dependent errors on the last rank only: every rank must raise (none waits in a collective)
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    gates = torch.rand(1, 8, 4)
    slope = torch.linspace(0.1, 0.5, 4)
    if rank == world - 1:
        gates[0, 3, 1] = -0.5
        slope[2] = float("nan")
    msgs = []
    for scheme in ("allgather", "ulysses", "ring"):
        with pytest.raises(ValueError, match=r"gates must be >= 0") as e:
            cp.attention(q, k, v, kind="moh", scheme=scheme, gates=gates, backend="torch")
        msgs.append(str(e.value))
    with pytest.raises(ValueError, match=r"slope must be finite and >= 0") as e:
        cp.attention(q, k, v, kind="lightning", scheme="allgather", slope=slope, backend="torch")
    msgs.append(str(e.value))
    o = cp.attention(q, k, v, kind="moh", scheme="allgather", gates=gates.clamp_min(0), backend="torch")
    assert torch.isfinite(o).all()
    return msgs


@pytest.mark.parametrize("world", [2, 4])
def test_data_dependent_error_on_one_rank_raises_on_every_rank(world):
    results = run_ranks(_one_rank_bad_job, world, timeout=240)  # spawning is slow on a loaded machine
    for rank, msgs in enumerate(results):
        for m in msgs:  # peers name the failing rank; the failing rank raises its own message
            assert (f"(raised on CP rank {world - 1})" in m) == (rank != world - 1), m


def test_validation_happens_before_any_process_group_is_needed():
    # an explicit (rank, world) tuple has no process group: reaching communication would fail
    # differently, so these ValueErrors prove validation runs first
    for pattern, kw in _bad_calls((0, 2)):
        q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
        with pytest.raises(ValueError, match=pattern):
            cp.attention(q, k, v, group=(0, 2), **kw)


def test_scheme_cost_closed_forms():
    P, N, H, Hkv, d = 8, 1 << 17, 32, 8, 128
    kw = dict(world=P, heads=H, kv_heads=Hkv, head_dim=d, dtype=torch.bfloat16)
    ag = cp.scheme_cost("softmax", "allgather", seq_len=N, **kw)
    assert ag["fwd"] == {"all_gather": {"bytes": (P - 1) * N // P * 2 * Hkv * d * 2, "calls": 1}}
    assert ag["bwd"] == {"reduce_scatter": {"bytes": (P - 1) * N // P * 2 * Hkv * d * 2, "calls": 1}}
    # LASP-2: independent of N, (P-1) H dk dv 4 per chunk held (2 under zigzag)
    l1 = cp.scheme_cost("lightning", "allgather", seq_len=N, **kw)
    l2 = cp.scheme_cost("lightning", "allgather", seq_len=2 * N, **kw)
    assert l1 == l2 and l1["fwd"]["all_gather"]["bytes"] == (P - 1) * H * d * d * 4 * 2
    assert cp.scheme_cost("lightning", "allgather", seq_len=N, balance="contiguous",
                          **kw)["fwd"]["all_gather"]["bytes"] == (P - 1) * H * d * d * 4
    # Ulysses: (P-1)/P (N/P) d (2 H_q + 2 H_kv) b per a2a pair (in + out, out has H_q heads)
    u = cp.scheme_cost("softmax", "ulysses", seq_len=N, **kw)
    assert u["fwd"]["all_to_all"] == {"bytes": (P - 1) * N // P // P * d * (2 * H + 2 * Hkv) * 2, "calls": 4}
    # ring moves as many K/V bytes forward as the all-gather, in P-1 calls
    r = cp.scheme_cost("softmax", "ring", seq_len=N, **kw)
    assert r["fwd"]["send_recv"] == {"bytes": ag["fwd"]["all_gather"]["bytes"], "calls": P - 1}
    with pytest.raises(ValueError, match="not supported"):
        cp.scheme_cost("s2", "tree", seq_len=N, **kw)
    # s2 under ulysses moves what softmax does (the pattern only changes compute)
    assert cp.scheme_cost("s2", "ulysses", seq_len=N, **kw) == u
    # lightning x usp (U=2): 4 all-to-alls over U, LASP-2 over the P/U ring: U*2 chunk states of H/U heads
    lu = cp.scheme_cost("lightning", "usp", seq_len=N, ulysses_degree=2, **kw)
    assert lu["fwd"]["all_to_all"]["calls"] == 4
    assert lu["fwd"]["all_gather"] == {"bytes": (P // 2 - 1) * 2 * 2 * (H // 2) * d * d * 4, "calls": 1}
    assert lu["bwd"]["reduce_scatter"] == lu["fwd"]["all_gather"]
    # LASP-1 (lightning ring): one fp32 state per hop; zigzag chain 0..2P-1 visits ranks 0..P-1, P-1..0
    state = H * d * d * 4
    z = [cp.scheme_cost("lightning", "ring", seq_len=N, rank=r, **kw) for r in range(P)]
    assert z[0]["fwd"] == {"send_recv": {"bytes": state, "calls": 1}}  # chunk 2P-1 waits for rank 1
    assert z[P - 1]["fwd"] == {"send_recv": {"bytes": state, "calls": 1}}  # chunk P is local after P-1
    assert all(zr["fwd"]["send_recv"]["calls"] == 2 for zr in z[1:P - 1])
    c0 = cp.scheme_cost("lightning", "ring", seq_len=N, rank=0, balance="contiguous", **kw)
    assert c0["fwd"] == {} and c0["bwd"] == {"send_recv": {"bytes": state, "calls": 1}}
    # ring (zigzag, no documents, c = N / 2P): rank r receives every chunk of the ranks after it and the
    # early chunk of the ranks before it; the fp32 dK/dV of its pieces comes back from every other rank
    c, row = N // (2 * P), Hkv * 2 * d
    for rk in (0, 3, P - 1):
        rr = cp.scheme_cost("softmax", "ring", seq_len=N, rank=rk, **kw)
        assert rr["fwd"]["send_recv"] == {"bytes": (2 * P - 2 - rk) * c * row * 2, "calls": P - 1}
        assert rr["bwd"]["send_recv"] == {"bytes": (2 * P - 2 - rk) * c * row * 2 + (P - 1 + rk) * c * row * 4,
                                          "calls": 2 * (P - 1)}
    # contiguous and causal: only the ranks before send anything; rank 0 receives nothing at all
    rc = [cp.scheme_cost("softmax", "ring", seq_len=N, rank=rk, balance="contiguous", **kw) for rk in range(P)]
    assert rc[0]["fwd"] == {} and rc[3]["fwd"]["send_recv"] == {"bytes": 3 * (N // P) * row * 2, "calls": 3}
    assert rc[P - 1]["bwd"]["send_recv"]["calls"] == P - 1  # K/V again, nothing of its own read by others
    # any length: ceil(N / P) slots per rank, the padding travels with the rest
    odd = cp.scheme_cost("softmax", "allgather", seq_len=100, **kw)
    assert odd["fwd"]["all_gather"]["bytes"] == (P - 1) * 13 * 2 * Hkv * d * 2



def _blocks_read_remotely(layout, world, n, hkv, rank, from_chunks=None):
    """Brute force from the full block mask: (kv head, block) pairs of other ranks' chunks (or of
    ``from_chunks``) read by ``rank``'s query blocks (zigzag)."""
    nb = n // layout.block_size
    cb = nb // (2 * world)

    def blocks(chunks):
        sel = torch.zeros(nb, dtype=torch.bool)
        for cid in chunks:
            sel[cid * cb:(cid + 1) * cb] = True
        return sel
    m = layout.block_mask(hkv, hkv, nb, nb)  # [hkv, nb, nb]
    mine = blocks(cp.chunk_ids(rank, world))
    src = ~mine if from_chunks is None else blocks(from_chunks) & ~mine
    read = m[:, mine].any(dim=1) & src[None, :]
    return int(read.sum())


@pytest.mark.parametrize("vert_stride", [4, 8])
def test_s2_exchange_moves_exactly_the_blocks_read(vert_stride):
    from seqpar.cp.s2_exchange import exchange_buffer_elements

    P, N, Hkv, d = 8, 1 << 15, 8, 128
    # resolved with the model's 32 query heads (the brute force below reads the same pattern)
    layout = S2Layout(block_size=64, local_blocks=4, vert_stride=vert_stride).with_heads(32)
    kw = dict(world=P, seq_len=N, heads=32, kv_heads=Hkv, head_dim=d)
    full = cp.scheme_cost("softmax", "allgather", **kw)["fwd"]["all_gather"]["bytes"]
    block_bytes = 64 * 2 * d * 2  # one (kv head, block) of K and V in bf16
    per_rank = [cp.scheme_cost("s2", "allgather", layout=layout, rank=r, **kw) for r in range(P)]
    for r, c in enumerate(per_rank):
        assert c["fwd"]["all_to_all"]["calls"] == 1 and c["bwd"]["all_to_all"]["calls"] == 1
        assert c["fwd"]["all_to_all"]["bytes"] == _blocks_read_remotely(layout, P, N, Hkv, r) * block_bytes
        assert c["fwd"]["all_to_all"]["bytes"] <= 1.2 / vert_stride * full + 2 * 3 * Hkv * block_bytes
    # what rank 0 sends (its backward receive): chunk 2P-1 is read by nobody else, only chunk 0 leaves
    cb = N // (2 * P) // 64
    from_chunk0 = sum(_blocks_read_remotely(layout, P, N, Hkv, q, from_chunks=[0]) for q in range(1, P))
    assert per_rank[0]["bwd"]["all_to_all"]["bytes"] == from_chunk0 * block_bytes
    # rank r's late chunk 2P-1-r goes only to the r ranks holding later chunks
    assert per_rank[1]["bwd"]["all_to_all"]["bytes"] == block_bytes * sum(
        _blocks_read_remotely(layout, P, N, Hkv, q, from_chunks=[1, 2 * P - 2]) for q in (0, *range(2, P)))
    assert per_rank[0]["fwd"]["all_to_all"]["bytes"] > per_rank[P - 1]["fwd"]["all_to_all"]["bytes"]
    # default (rank=None) is the busiest rank
    assert cp.scheme_cost("s2", "allgather", layout=layout, **kw) == max(
        per_rank, key=lambda c: c["fwd"]["all_to_all"]["bytes"] + c["bwd"]["all_to_all"]["bytes"])
    # peak buffers: below the plain all-gather's two full-length copies on every rank
    for r in range(P):
        mem = exchange_buffer_elements(cp.make_partition(N, (0, P)), layout, kv_heads=Hkv, width=2 * d, rank=r)
        assert mem["buffer"] <= mem["allgather"] // 2 and mem["total"] < 0.75 * mem["allgather"], (r, mem)
    # a dense head reads every causal block: it receives that head's whole causal prefix
    dense = S2Layout(block_size=64, local_blocks=4, vert_stride=vert_stride, num_dense_heads=1).with_heads(32)
    got = cp.scheme_cost("s2", "allgather", layout=dense, rank=0, **kw)["fwd"]["all_to_all"]["bytes"]
    assert got == _blocks_read_remotely(dense, P, N, Hkv, 0) * block_bytes
    assert got > per_rank[0]["fwd"]["all_to_all"]["bytes"]
    with pytest.raises(ValueError, match="needs layout="):
        cp.scheme_cost("s2", "allgather", **kw)


def test_ring_and_allgather_window_move_only_the_halo():
    """Sliding-window softmax under the ring and allgather (host plans, closed forms): a rank receives only the
    ``window - 1`` halo rows before its own pieces, hops wholly outside every window post nothing,
    every planned pair starts at its query piece's window edge, and a window covering the sequence
    plans exactly the full causal ring."""
    from seqpar.cp.ring import plan, step_bytes

    P, N, Hkv, d, w = 4, 64, 2, 16, 5
    kw = dict(world=P, heads=4, kv_heads=Hkv, head_dim=d, dtype=torch.float32)
    row = Hkv * 2 * d * 4
    part = cp.make_partition(N, (0, P), balance="contiguous")
    for r in range(P):
        # contiguous, window below a chunk: only rank r-1's last w-1 rows, nothing from the others
        assert step_bytes(part, r, True, w) == ([w - 1 if r else 0, 0, 0], [w - 1 if r < P - 1 else 0, 0, 0])
        c = cp.scheme_cost("softmax", "ring", seq_len=N, rank=r, balance="contiguous", window=w, **kw)
        assert c["fwd"] == ({"send_recv": {"bytes": (w - 1) * row, "calls": 1}} if r else {})
        for st in plan(part, r, True, w):
            for pr in st.pairs:  # no key before the window of the piece's first query is ever computed
                assert pr.kv_pos >= pr.q_pos - w + 1 and pr.kv_len > 0
    # zigzag P=2, chunks of 6: rank 1's chunk 1 (positions 6..11) reads rows 3..5 of rank 0's chunk 0,
    # rank 0's chunk 3 (18..23) rows 15..17 of rank 1's chunk 2; windows of 4
    z = cp.make_partition(24, (0, 2), balance="zigzag")
    assert step_bytes(z, 0, True, 4) == ([3], [3]) and step_bytes(z, 1, True, 4) == ([3], [3])
    # a window at least the sequence: the full causal ring (same rows, same pairs)
    assert [plan(z, r, True, 24) == plan(z, r, True) for r in range(2)] == [True, True]
    full = cp.scheme_cost("softmax", "ring", seq_len=N, balance="contiguous", **kw)
    assert cp.scheme_cost("softmax", "ring", seq_len=N, balance="contiguous", window=N, **kw) == full
    # allgather: only the halo, w - 1 rows before each of the busiest rank's two zigzag chunks, one
    # all-to-all each way; a window covering the sequence: the plain all-gather (the halo saves nothing)
    halo = {"all_to_all": {"bytes": 2 * (w - 1) * row, "calls": 1}}
    assert cp.scheme_cost("softmax", "allgather", seq_len=N, window=w, **kw) == {"fwd": halo, "bwd": halo}
    assert (cp.scheme_cost("softmax", "allgather", seq_len=N, window=N, **kw)
            == cp.scheme_cost("softmax", "allgather", seq_len=N, **kw))
    for bad, match in (({"window": 0}, "window"), ({"window": 3, "causal": False}, "causal=True")):
        with pytest.raises(ValueError, match=match):
            cp.scheme_cost("softmax", "ring", seq_len=N, **kw, **bad)
    with pytest.raises(ValueError, match="kind='softmax'"):
        cp.scheme_cost("moh", "ring", seq_len=N, window=4, **kw)
    q = k = v = torch.randn(1, 8, 2, 16)
    for bad, match in (({"window": 0}, "window"), ({"window": 2, "causal": False}, "causal=True")):
        with pytest.raises(ValueError, match=match):
            cp.attention(q, k, v, kind="softmax", scheme="ring", group=(0, 2), **bad)
    with pytest.raises(ValueError, match="unexpected keyword"):
        cp.attention(q, k, v, kind="moh", scheme="ring", group=(0, 2), gates=torch.ones(1, 8, 2), window=4)
