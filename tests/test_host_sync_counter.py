"""``cp.count_host_syncs`` sees every host read and host-to-device copy, and the kernels' GPU path makes
none per call in steady state.

The counter watches aten ops (a ``TorchDispatchMode``) and tensor methods (a ``TorchFunctionMode``),
not a list of call sites, so a copy or read issued through any API and from any module (seqpar,
megatron-core, this test file) is counted. What a GPU would not run (the Triton interpreter's
emulation, the torch fallbacks) is set apart in ``excluded``.

The second half runs every op's public entry on its Triton path (the launchers, plans and autograd
Functions a GPU runs; the kernels themselves in the interpreter) as the layers of one steady-state
step: dense calls make no host read or copy at all, varlen calls one read of the step's fresh
``cu_seqlens`` for the whole step, whatever the number of layers (Lightning's varlen chunk plan,
S2 / flash tile plans, MoH active rows, Lightning's padded-document segments).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar import cp
from seqpar.kernels import S2Layout, flash_attention, lightning_attention, moh_attention, s2_attention


def _count(fn):
    with cp.count_host_syncs() as n:
        fn()
    return n


READS = {
    "item": lambda x: x[0].item(),
    "bool": lambda x: bool(x[0] > 0),
    "int": lambda x: int(x[1]),
    "float": lambda x: float(x[1]),
    "f-string": lambda x: f"{x[1]}",
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),
    "equal": lambda x: torch.equal(x, x),
    "nonzero": lambda x: x.nonzero(),
    "where(cond)": lambda x: torch.where(x > 1),
    "mask index": lambda x: x[x > 1],
    "mask assign tensor": lambda x: x.clone().__setitem__(x > 1, x[:1].expand(2)),
    "masked_select": lambda x: x.masked_select(x > 1),
    "unique": lambda x: x.unique(),
    "repeat_interleave": lambda x: x.repeat_interleave(x.long()),
    "bincount": lambda x: x.long().bincount(),
}
COPIES = {
    "tensor": lambda x: torch.tensor([1, 2]),
    "tensor device=": lambda x: torch.tensor([1, 2], device=x.device),
    "as_tensor": lambda x: torch.as_tensor([1.0]),
    "new_tensor": lambda x: x.new_tensor([3]),
    "from_numpy": lambda x: torch.from_numpy(np.zeros(2)),
    "list index": lambda x: x[[0, 2]],
    "to(other device)": lambda x: x.to("meta"),   # the meta device stands in for a GPU
    "to(other device, dtype)": lambda x: x.to("meta", torch.float64),
    "copy_ from cpu": lambda x: torch.empty(4, device="meta").copy_(x),
}
FREE = {
    "arithmetic": lambda x: (x * 2 + 1).sum(),
    "device fills": lambda x: (torch.zeros(3, device=x.device), torch.arange(4, device=x.device),
                               torch.full((2,), 7, device=x.device)),
    "dtype cast": lambda x: x.to(torch.float64),
    "scalar assign": lambda x: x.clone().__setitem__(0, 5),
    "scalar mask assign (masked_fill)": lambda x: x.clone().__setitem__(x > 1, 0),
    "repeat_interleave output_size": lambda x: x.repeat_interleave(x.long(), output_size=6),
    "index_select": lambda x: x.index_select(0, torch.arange(2)),
    "topk / sort / cumsum": lambda x: (x.topk(2), x.sort(), x.cumsum(0)),
    "scatter_add": lambda x: torch.zeros(4).scatter_add_(0, torch.arange(4), x),
}


@pytest.mark.parametrize("what", list(READS))
def test_counts_every_host_read(what):
    x = torch.tensor([0.0, 2.0, 3.0, 1.0])
    n = _count(lambda: READS[what](x))
    assert n.reads >= 1 and n.total == n.reads, (what, n)
    assert all(__file__ in s for s in n.sites), n.sites  # attributed to this (non-seqpar) file


@pytest.mark.parametrize("what", list(COPIES))
def test_counts_every_host_to_device_copy(what):
    x = torch.tensor([0.0, 2.0, 3.0, 1.0])
    n = _count(lambda: COPIES[what](x))
    assert n.copies >= 1, (what, n)


@pytest.mark.parametrize("what", list(FREE))
def test_device_side_work_is_free(what):
    x = torch.tensor([0.0, 2.0, 3.0, 1.0])
    n = _count(lambda: FREE[what](x))
    assert n.total == 0, (what, n.sites)


def test_same_device_moves_count_in_seqpar_code_only():
    # seqpar's own `.to(device)` of a CPU tensor is counted even on a CPU-only machine (where a GPU run
    # would copy); another library's same-device move (DeepSpeed's gradient buckets) is not
    from seqpar.kernels.s2.plan import build_plan_uncached

    x = torch.ones(4)
    assert _count(lambda: (x.to(x.device), x.to("cpu", torch.float64), torch.empty(4).copy_(x))).total == 0
    plan = build_plan_uncached(None, True, 1, 64, 64, 0, 0, None, 16)
    n = _count(lambda: plan.to("cpu"))
    assert n.copies == 7 and all("kernels/s2/plan.py" in s for s in n.sites), n.sites
    assert _count(lambda: plan.to("cpu")).total == 0  # copied once per device, then kept


def test_moves_of_computed_tensors_are_free_in_seqpar_code():
    # in seqpar's code, moving a tensor the block computed (or a view of it) within its device is free
    # (on a GPU it never left the device: LASP-1's `final.copy_(s_out[pos])`); pre-existing host state
    # (a buffer) moved to the CPU "device" still counts: on a GPU run that is a host-to-device copy
    import os

    import seqpar

    src = ("def move(buf, x):\n"
           "    y = x * 2\n"
           "    out = x.new_zeros(4)\n"
           "    out.copy_(y[:4])\n"
           "    return y.to('cpu'), y[1:].to(x.device), buf.to(x.device)\n")
    ns = {}
    exec(compile(src, os.path.join(os.path.dirname(seqpar.__file__), "_probe.py"), "exec"), ns)
    buf = torch.arange(4.0)
    n = _count(lambda: ns["move"](buf, torch.ones(8)))
    assert n.copies == 1 and n.reads == 0 and "_probe.py:5" in n.sites[0], n.sites


def test_cpu_fallbacks_are_set_apart():
    q = torch.randn(1, 40, 2, 16)
    gates = (torch.rand(1, 40, 2) < 0.5).float()
    n = _count(lambda: moh_attention(q, q, q, gates, backend="torch"))
    assert n.excluded and all("moh/torch_impl.py" in s for s in n.excluded)
    assert n.total == 1 and "_common.py" in n.sites[0]  # check_data of the gates: eager outside step_checks


B, N, H, HKV, D = 1, 48, 2, 1, 16
CU = (0, 17, 30, 48)


def _layers(op, cu, layers: int):
    """A steady-state step (after a first one): ``layers`` calls of ``op`` on shared inputs inside one
    step_checks, as a model's layers, forward and backward; returns its SyncCount."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g, requires_grad=True)
    k = torch.randn(B, N, HKV, D, generator=g, requires_grad=True)
    v = torch.randn(B, N, HKV, D, generator=g, requires_grad=True)
    extra = {}
    if op == "moh":
        extra["gates"] = (torch.rand(B, N, H, generator=g) < 0.6).float().requires_grad_()
    if op == "lightning padded":
        extra["unpadded"] = torch.tensor([0, 15, 27, 40], dtype=torch.int32)
    slope = torch.tensor([0.1, 0.3])
    layout = S2Layout(block_size=16, local_blocks=2, vert_stride=2)

    def step():
        kw = {} if cu is None else {"cu_seqlens": torch.tensor(cu, dtype=torch.int32)}  # fresh each step
        if op == "lightning padded":
            kw["cu_seqlens_unpadded"] = extra["unpadded"].clone()
        with cp.count_host_syncs() as n:
            with cp.step_checks():
                loss = 0
                for _ in range(layers):
                    if op == "s2":
                        o = s2_attention(q, k, v, layout, backend="triton", **kw)
                    elif op == "flash":
                        o = flash_attention(q, k, v, backend="triton", **kw)
                    elif op == "moh":
                        o = moh_attention(q, k, v, extra["gates"], backend="triton", **kw)
                    elif op == "lightning":
                        o, _ = lightning_attention(q, k, v, slope, backend="triton", **kw)
                    else:  # the padded-document wrapper (its inner call is "lightning" above): torch backend
                        o, _ = lightning_attention(q, k, v, slope, backend="torch", **kw)
                    loss = loss + o.float().square().sum()
                loss.backward()
        return n

    step()  # first step: plans, segments, Triton's interpreter
    return step()


@pytest.mark.parametrize("op, cu", [("s2", CU), ("flash", None), ("moh", None), ("moh", CU), ("lightning", CU),
                                    ("lightning padded", CU)])
def test_kernels_triton_path_makes_no_host_sync_per_layer(op, cu, monkeypatch):
    monkeypatch.setenv("SEQPAR_DEBUG", "0")
    n = _layers(op, cu, 2)  # a steady-state step of two layers: anything per layer would show twice
    # per step: the data check (MoH gates, Lightning slopes: one read at the step's end), and one read
    # per fresh cu_seqlens tensor (the padded Lightning call takes two)
    reads = (1 if op in ("moh", "lightning", "lightning padded") else 0) + \
        (0 if cu is None else (2 if op == "lightning padded" else 1))
    assert (n.reads, n.copies) == (reads, 0), (op, cu, n.sites)
