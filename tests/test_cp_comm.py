"""seqpar.cp.comm collectives + ledger, and shard/unshard round trips, on spawned gloo ranks."""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.cp.comm import Comm


def _collectives_job(rank: int, world: int) -> dict:
    comm = Comm(None)
    assert (comm.rank, comm.world) == (rank, world)
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5) + 1000 * rank  # 120 bytes
    with cp.comm_ledger() as outer:
        with cp.comm_ledger() as led:
            g = comm.all_gather(x)
        expect = torch.cat([torch.arange(30.).reshape(2, 3, 5) + 1000 * r for r in range(world)])
        assert torch.equal(g, expect)
        assert led.summary() == {"all_gather": {"bytes": (world - 1) * 120, "calls": 1}}
        assert led.records[0].shape == (2, 3, 5) and led.records[0].dtype == torch.float32

        # async all-gather in bf16: bytes follow the dtype
        xb = x.to(torch.bfloat16)
        with cp.comm_ledger() as led:
            pend = comm.all_gather(xb, async_op=True)
            gb = pend.wait()
        assert torch.equal(gb, expect.to(torch.bfloat16))
        assert led.summary() == {"all_gather": {"bytes": (world - 1) * 60, "calls": 1}}

        # reduce-scatter: piece r of the sum over ranks
        y = torch.stack([torch.full((3, 7), float(r + 10 * rank)) for r in range(world)])  # [world, 3, 7]
        y = y.reshape(world * 3, 7)
        with cp.comm_ledger() as led:
            rs = comm.reduce_scatter(y)
        want = sum(torch.full((3, 7), float(rank + 10 * s)) for s in range(world))
        assert torch.equal(rs, want)
        assert led.summary() == {"reduce_scatter": {"bytes": (world - 1) * 3 * 7 * 4, "calls": 1}}

        # all-to-all: piece j goes to rank j
        z = torch.stack([torch.full((2, 3), float(100 * rank + j)) for j in range(world)]).reshape(world * 2, 3)
        with cp.comm_ledger() as led:
            a = comm.all_to_all(z.double())
        want = torch.stack([torch.full((2, 3), float(100 * s + rank)) for s in range(world)]).reshape(world * 2, 3)
        assert torch.equal(a, want.double())
        assert led.summary() == {"all_to_all": {"bytes": (world - 1) * 2 * 3 * 8, "calls": 1}}

        # ring pass both ways, two tensors per call
        with cp.comm_ledger() as led:
            fwd = comm.ring_pass([torch.full((4,), float(rank)), torch.full((2, 2), float(rank), dtype=torch.float16)])
            k, v = fwd.wait()
            back = comm.ring_pass([torch.full((3,), float(rank))], reverse=True).wait()[0]
        assert torch.equal(k, torch.full((4,), float((rank - 1) % world)))
        assert torch.equal(v, torch.full((2, 2), float((rank - 1) % world), dtype=torch.float16))
        assert torch.equal(back, torch.full((3,), float((rank + 1) % world)))
        assert led.summary() == {"send_recv": {"bytes": 16 + 8 + 12, "calls": 3}}
    # the outer ledger saw every call of the inner ones
    assert outer.calls_by_op() == {"all_gather": 2, "reduce_scatter": 1, "all_to_all": 1, "send_recv": 3}
    assert outer.total_bytes() == (world - 1) * (120 + 60 + 84 + 48) + 36

    with pytest.raises(ValueError, match="divisible by world"):
        comm.reduce_scatter(torch.zeros(world * 2 + 1, 3))
    return {"ok": True}


def _shard_job(rank: int, world: int, full: dict) -> dict:
    out = {}
    for balance in ("zigzag", "contiguous"):
        for name, (x, dim) in full.items():
            loc = cp.shard(x, None, dim=dim, balance=balance)
            assert torch.equal(loc, cp.shard(x, (rank, world), dim=dim, balance=balance))
            idx = cp.token_index(rank, world, x.shape[dim], balance)
            assert torch.equal(loc, x.index_select(dim, idx))
            back = cp.unshard(loc, None, dim=dim, balance=balance)
            assert torch.equal(back, x), (name, balance)
            out[(name, balance)] = loc
    # varlen THD round trip
    x, cu = full["packed"][0], torch.tensor([0, 4 * world, 4 * world + 2 * world, 12 * world], dtype=torch.int32)
    loc, cu_loc = cp.shard_varlen(x, cu, None)
    assert torch.equal(cu_loc, cu // world)
    assert torch.equal(cp.unshard_varlen(loc, cu, None), x)
    # autograd: a loss on the full (replicated) tensor gives this rank its shard of the gradient
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    leaf = loc.clone().requires_grad_()
    (cp.unshard_varlen(leaf, cu, None) * w).sum().backward()
    assert torch.equal(leaf.grad, cp.shard_varlen(w, cu, None)[0])
    # any length (padding slots) and documents of any length: the round trip and its gradient
    n_odd = x.shape[1] - 1
    cu_odd = torch.tensor([0, 1, 4, n_odd], dtype=torch.int32)
    for balance in ("zigzag", "contiguous"):
        for cu_ in (None, cu_odd):
            xo = x[:, :n_odd]
            part = cp.make_partition(n_odd, None, balance=balance, cu_seqlens=cu_)
            leaf = cp.shard(xo, None, balance=balance, cu_seqlens=cu_).requires_grad_()
            assert leaf.shape[1] == part.local_len == -(-n_odd // world)
            back = cp.unshard(leaf, None, balance=balance, seq_len=n_odd, cu_seqlens=cu_)
            assert torch.equal(back, xo) and torch.equal(part.unshard(leaf, None), xo)
            (back * w[:, :n_odd]).sum().backward()
            assert torch.equal(leaf.grad, part.shard(w[:, :n_odd], rank))  # 0 in the padding slots
    for balance in ("zigzag", "contiguous"):
        xb, dim = full["seq_first"]
        w = torch.randn(xb.shape, generator=torch.Generator().manual_seed(7))
        leaf = cp.shard(xb, None, dim=dim, balance=balance).requires_grad_()
        ((cp.unshard(leaf, None, dim=dim, balance=balance) ** 2) * w).sum().backward()
        assert torch.allclose(leaf.grad, cp.shard(2 * xb * w, None, dim=dim, balance=balance)), balance
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_and_ledger(world):
    assert run_ranks(_collectives_job, world) == [{"ok": True}] * world


@pytest.mark.parametrize("world", [2, 4])
def test_shard_unshard_round_trip(world):
    torch.manual_seed(world)
    n = 2 * world * 3  # divisible by 2P and P, not a power of two
    full = {
        "bshd": (torch.randn(2, n, 3, 5), 1),         # odd heads and feature size
        "seq_first": (torch.randn(n, 2, 7), 0),        # Megatron's [s, b, ...]
        "last_dim": (torch.randn(3, 2, n), -1),
        "packed": (torch.randn(1, 12 * world, 2, 3), 1),
    }
    res = run_ranks(_shard_job, world, full)
    for balance in ("zigzag", "contiguous"):
        x = full["bshd"][0]
        locs = [r[("bshd", balance)] for r in res]
        # every token lands on exactly one rank
        assert sum(l.shape[1] for l in locs) == n
        if balance == "zigzag":
            c = n // (2 * world)
            for r, l in enumerate(locs):
                assert torch.equal(l[:, :c], x[:, r * c:(r + 1) * c])
                assert torch.equal(l[:, c:], x[:, (2 * world - 1 - r) * c:(2 * world - r) * c])


def _bad_unshard_job(rank: int, world: int) -> None:
    cp.unshard(torch.zeros(3, 3), None, dim=0, balance="zigzag", seq_len=7)


def test_rank_error_propagates_with_traceback():
    with pytest.raises(RuntimeError, match=r"rank \d of 2 failed:(.|\n)*2 ranks x 3 local tokens cannot hold seq_len 7"):
        run_ranks(_bad_unshard_job, 2, timeout=60)
