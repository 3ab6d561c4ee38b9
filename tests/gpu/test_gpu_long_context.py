"""Long-context launches: 64K and 128K tokens per call (``pytest tests/gpu -m long_context``).

These are the shapes where launch limits and 32-bit offsets break (issue 20 item 3):

* Lightning at 128K tokens x 32 heads has 2048 x 32 = 65536 (chunk, head) programs, one past CUDA's
  65535 on grid axes 1 / 2 where the kernels used to put them (the grids are 1-D now); at 64 heads
  and head dim 128 its per-chunk state buffers hold 2048 x 64 x 128 x 128 = 2^31 elements, so every
  state offset needs 64 bits. Checked without a reference: the call equals two chained halves
  (``initial_state`` = the first half's ``final_state``), whose buffers are half as large.
* flash / S2 at 64K tokens x 64 heads x batch 4: q holds 2^31 elements (batch offsets past 2^31).
  Batch element 3 is a copy of element 0: its output and gradients must equal element 0's exactly;
  element 0's first and last query tiles are checked against the fp64 reference.
* MoH at 128K tokens: its 1-D grid over (row tiles x batch x heads).

On CPU (``SEQPAR_GPU_DRYRUN=1``) the same code runs at 512 tokens and 2 heads.
"""

from __future__ import annotations

import pytest
import torch

from gpu_common import CUDA, DEVICE, heads, long_seq
from tolerance import GRAD_FACTOR, OUT_FACTOR, assert_rel_close

from seqpar.kernels import S2Layout, flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.kernels.s2.reference import attention_reference

pytestmark = pytest.mark.long_context


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    # launch limits and offsets are under test, not configs: the deterministic defaults (autotuning
    # at these sizes would run every config of every kernel several times)
    monkeypatch.setenv("SEQPAR_AUTOTUNE", "0")
    torch.manual_seed(0)
    yield
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("n, h", [(131072, 32), (131072, 64)], ids=["128k-32h-grid", "128k-64h-64bit-states"])
def test_lightning_128k_equals_two_chained_halves(n, h):
    n, h = long_seq(n), heads(h)
    d = 128 if CUDA else 16
    q, k, v = (torch.randn(1, n, hh, d, device=DEVICE, dtype=torch.bfloat16) * 0.5 for hh in (h, h // 2, h // 2))
    k = k * d ** -0.5
    slope = lightning_slopes(h, 0, 2).to(DEVICE)
    do = torch.randn(1, n, h, d, device=DEVICE, dtype=torch.bfloat16)

    def run(split: bool):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if split:
            m = n // 2
            o1, s1 = lightning_attention(*(x[:, :m] for x in xs), slope, output_final_state=True, backend="triton")
            o2, s2 = lightning_attention(*(x[:, m:] for x in xs), slope, initial_state=s1, output_final_state=True,
                                         backend="triton")
            o, fin = torch.cat([o1, o2], 1), s2
        else:
            o, fin = lightning_attention(*xs, slope, output_final_state=True, backend="triton")
        ((o.float() * do.float()).sum() + fin.sum()).backward()
        return [o.detach(), fin.detach()] + [x.grad for x in xs]
    whole = run(False)
    halves = run(True)
    for name, a, b in zip(("o", "final_state", "dq", "dk", "dv"), whole, halves):
        assert torch.isfinite(a).all(), name
        # the same math in two launches: rounding of the chunk snapshots only
        scale = b.float().abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, name


def _copy_batch_inputs(b, n, h, hkv, d):
    q, k, v = (torch.randn(b, n, hh, d, device=DEVICE, dtype=torch.bfloat16) for hh in (h, hkv, hkv))
    for t in (q, k, v):
        t[-1] = t[0]
    return q, k, v


@pytest.mark.parametrize("kind", ["flash", "s2"])
def test_softmax_64k_batch_offsets_past_2_31(kind):
    b, n, h, hkv = (4, long_seq(65536), heads(64), heads(8)) if CUDA else (2, long_seq(65536), 2, 1)
    d = 128 if CUDA else 16
    q, k, v = _copy_batch_inputs(b, n, h, hkv, d)
    layout = S2Layout(block_size=64 if CUDA else 16, local_blocks=4, vert_stride=16)
    do = torch.randn(b, n, h, d, device=DEVICE, dtype=torch.bfloat16)
    rows = 64 if CUDA else 32  # fp64 reference on element 0's first and last query rows
    do[0, rows:-rows] = 0
    do[-1] = do[0]
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if kind == "s2":
        o = s2_attention(*xs, layout, backend="triton")
    else:
        o = flash_attention(*xs, backend="triton")
    (o.float() * do.float()).sum().backward()
    # element b-1 is element 0 at offsets past 2^31 elements: bit-identical results
    for name, t in (("o", o), ("dq", xs[0].grad), ("dk", xs[1].grad), ("dv", xs[2].grad)):
        assert torch.equal(t[-1], t[0]), name
    assert q.numel() >= (2 ** 31 if CUDA else 0)
    # element 0's first and last query tiles against the reference (dk / dv: from those rows only)
    lay = layout if kind == "s2" else None
    for lo, hi in ((0, rows), (n - rows, n)):
        sl = [q[:1, lo:hi].detach(), k[:1].detach(), v[:1].detach()]

        def ref(dt):
            a, bb, c = (x.detach().to(dt).requires_grad_() for x in sl)
            ro, _ = attention_reference(a, bb, c, layout=lay, q_offset=lo)
            (ro * do[:1, lo:hi].to(dt)).sum().backward()
            return ro.detach(), a.grad
        low, r64 = ref(torch.bfloat16), ref(torch.float64)
        assert_rel_close("o", o[:1, lo:hi].detach(), low[0], r64[0], OUT_FACTOR)
        assert_rel_close("dq", xs[0].grad[:1, lo:hi], low[1], r64[1], GRAD_FACTOR)
    both = [(0, rows), (n - rows, n)]

    def ref_kv(dt):
        bb, c = (t[:1].detach().to(dt).requires_grad_() for t in (k, v))
        loss = 0
        for lo, hi in both:
            ro, _ = attention_reference(q[:1, lo:hi].to(dt), bb, c, layout=lay, q_offset=lo)
            loss = loss + (ro * do[:1, lo:hi].to(dt)).sum()
        loss.backward()
        return bb.grad, c.grad
    low, r64 = ref_kv(torch.bfloat16), ref_kv(torch.float64)
    assert_rel_close("dk", xs[1].grad[:1], low[0], r64[0], GRAD_FACTOR)
    assert_rel_close("dv", xs[2].grad[:1], low[1], r64[1], GRAD_FACTOR)


def test_moh_128k():
    n, h = long_seq(131072), heads(16)
    d = 128 if CUDA else 16
    q, k, v = (torch.randn(1, n, hh, d, device=DEVICE, dtype=torch.bfloat16) for hh in (h, h // 4 or 1, h // 4 or 1))
    gates = ((torch.rand(1, n, h, device=DEVICE) + 0.1) * (torch.rand(1, n, h, device=DEVICE) < 0.25)).bfloat16()
    rows = 128 if CUDA else 32
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = moh_attention(*xs, gates, backend="triton")
    do = torch.zeros_like(o)
    do[:, -rows:] = torch.randn_like(o[:, -rows:])
    (o.float() * do.float()).sum().backward()
    assert torch.isfinite(o).all() and all(torch.isfinite(x.grad).all() for x in xs)
    assert (o[gates == 0] == 0).all()
    # the last rows against the reference over all keys (outputs; dq of those rows)
    from seqpar.kernels.moh.reference import moh_attention_ref

    def ref(dt):
        a, bb, c = (t.detach().to(dt).requires_grad_() for t in (q[:, -rows:], k, v))
        ro, _ = moh_attention_ref(a, bb, c, gates[:, -rows:].to(dt), q_offset=n - rows)
        (ro * do[:, -rows:].to(dt)).sum().backward()
        return ro.detach(), a.grad
    low, r64 = ref(torch.bfloat16), ref(torch.float64)
    assert_rel_close("o", o[:, -rows:].detach(), low[0], r64[0], OUT_FACTOR)
    assert_rel_close("dq", xs[0].grad[:, -rows:], low[1], r64[1], GRAD_FACTOR)
