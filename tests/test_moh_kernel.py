"""MoH attention kernels (Triton under the interpreter, torch fallback) vs the fp64 all-heads reference."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import moh_attention
from seqpar.kernels.moh import count_computed_pairs, moh_attention_ref
from tolerance import GRAD_FACTOR, assert_rel_close

BACKENDS = ["triton", "torch"]


def make_inputs(b, sq, sk, h, hkv, d, dtype, active=0.5, gate_dtype=None):
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, dtype=dtype)
    v = torch.randn(b, sk, hkv, d, dtype=dtype)
    keep = torch.rand(b, sq, h) < active
    gates = (torch.rand(b, sq, h) + 0.1) * keep
    return q, k, v, gates.to(gate_dtype or dtype)


def grads_of(fn, inputs, do, dlse):
    """Run fn on fresh leaves; backprop through o and the finite part of lse."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, lse = fn(*leaves)
    loss = (o.to(do.dtype) * do).sum() + (torch.where(torch.isinf(lse), 0.0, lse).to(dlse.dtype) * dlse).sum()
    loss.backward()
    return o.detach(), lse.detach(), [x.grad for x in leaves]


def check_against_reference(backend, q, k, v, gates, **kw):
    do = torch.randn(q.shape, dtype=q.dtype)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1])
    ours = grads_of(lambda *x: moh_attention(*x, return_lse=True, backend=backend, **kw), (q, k, v, gates), do, dlse)
    low = grads_of(lambda *x: moh_attention_ref(*x, **kw), (q, k, v, gates), do, dlse)
    ref = grads_of(lambda *x: moh_attention_ref(*x, **kw), [t.double() for t in (q, k, v, gates)],
                   do.double(), dlse.double())
    (o, lse, g), (o_l, lse_l, g_l), (o_r, lse_r, g_r) = ours, low, ref
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_rel_close("o", o, o_l, o_r)
    # -inf exactly where the gate is 0 or the row sees no key; finite elsewhere
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))
    fin = torch.isfinite(lse_r)
    assert_rel_close("lse", lse[fin], lse_l[fin].float(), lse_r[fin])
    for name, a, a_l, a_r in zip(("dq", "dk", "dv", "dgates"), g, g_l, g_r):
        assert a.dtype == a_l.dtype
        assert_rel_close(name, a, a_l, a_r, factor=GRAD_FACTOR)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,hkv", [(6, 6), (6, 3), (6, 2), (6, 1)])
def test_gqa_odd_shapes_bf16(backend, h, hkv):
    check_against_reference(backend, *make_inputs(2, 45, 45, h, hkv, 24, torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtypes(backend, dtype):
    check_against_reference(backend, *make_inputs(1, 33, 33, 4, 2, 16, dtype, active=0.6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_gates_with_bf16_inputs(backend):
    """The router emits fp32 gates; dgates keeps their dtype."""
    check_against_reference(backend, *make_inputs(1, 40, 40, 4, 2, 32, torch.bfloat16, gate_dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gate_columns_and_fully_active(backend):
    q, k, v, gates = make_inputs(2, 37, 37, 6, 3, 16, torch.bfloat16)
    gates[:, :, 1] = 0  # a head no token uses
    gates[1, :, 4] = 0  # a head batch 1 does not use
    gates[0, :, 5] = torch.rand(37) + 0.5  # a head batch 0 uses everywhere
    o, _, (dq, dk, dv, dg) = check_against_reference(backend, q, k, v, gates)
    assert torch.all(o[:, :, 1] == 0) and torch.all(dq[:, :, 1] == 0) and torch.all(dg[:, :, 1] == 0)
    dense = torch.rand(2, 37, 6).add(0.1).to(torch.bfloat16)
    check_against_reference(backend, q, k, v, dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_gates_zero(backend):
    q, k, v, gates = make_inputs(1, 20, 20, 2, 1, 16, torch.float32, active=0.0)
    o, lse, grads = check_against_reference(backend, q, k, v, gates)
    assert torch.all(o == 0) and torch.all(torch.isneginf(lse))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_and_scale(backend):
    check_against_reference(backend, *make_inputs(2, 29, 51, 4, 2, 16, torch.bfloat16), causal=False, sm_scale=0.3)


@pytest.mark.parametrize("causal,q_offset,k_offset", [(True, 0, 0), (False, 0, 0), (True, 21, 10)])
def test_dkdv_row_tile_smaller_than_key_block(monkeypatch, causal, q_offset, k_offset):
    """The dk/dv kernel with query-row tiles half its key block (what sm_80 runs at 64 x 128 half
    tiles: 32 rows x 64 keys; here 16 x 32 under the interpreter) is exact, causal start included."""
    from seqpar.kernels.moh import triton_bwd

    monkeypatch.setattr(triton_bwd, "dkdv_row_tile", lambda tune, block_m: block_m // 2)
    q, k, v, gates = make_inputs(2, 77, 77, 4, 2, 16, torch.bfloat16)
    if q_offset:
        q, gates, k, v = q[:, q_offset:], gates[:, q_offset:], k[:, k_offset:], v[:, k_offset:]
    check_against_reference("triton", q, k, v, gates, causal=causal, q_offset=q_offset, k_offset=k_offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_chunk_equals_rows_of_full(backend):
    """A chunk of queries against the full K/V (as context parallelism sends it) equals those rows."""
    q, k, v, gates = make_inputs(1, 70, 70, 4, 2, 16, torch.float32)
    o_full, lse_full = moh_attention(q, k, v, gates, return_lse=True, backend=backend)
    lo, hi = 21, 53
    o_c, lse_c = moh_attention(q[:, lo:hi], k, v, gates[:, lo:hi], q_offset=lo, return_lse=True, backend=backend)
    torch.testing.assert_close(o_c, o_full[:, lo:hi], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_c, lse_full[:, :, lo:hi], rtol=1e-5, atol=1e-6)
    # the same chunk with gradients, and keys that start later than some queries (k_offset)
    check_against_reference(backend, q[:, lo:hi], k[:, 10:], v[:, 10:], gates[:, lo:hi], q_offset=lo, k_offset=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_alignment_is_bottom_right(backend):
    """seq_q < seq_k without offsets: the queries are the last seq_q positions of the keys."""
    q, k, v, gates = make_inputs(1, 19, 50, 4, 2, 16, torch.float32)
    full_q = torch.cat([torch.randn(1, 31, 4, 16), q], dim=1)
    full_g = torch.cat([torch.rand(1, 31, 4), gates], dim=1)
    o_full = moh_attention(full_q, k, v, full_g, backend=backend)
    torch.testing.assert_close(moh_attention(q, k, v, gates, backend=backend), o_full[:, 31:], rtol=1e-5, atol=1e-6)
    check_against_reference(backend, q, k, v, gates)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_pairs_are_never_read(backend):
    """NaN in q and in the upstream gradient at gate-0 pairs cannot reach any output or gradient."""
    q, k, v, gates = make_inputs(2, 40, 40, 4, 2, 16, torch.bfloat16)
    off = (gates == 0).unsqueeze(-1)
    q = q.masked_fill(off, float("nan")).requires_grad_()
    k, v, gates = (t.requires_grad_() for t in (k, v, gates))
    o, lse = moh_attention(q, k, v, gates, return_lse=True, backend=backend)
    assert torch.isfinite(o).all() and torch.all(o.masked_select(off) == 0)
    torch.autograd.backward([o], [torch.randn_like(o).masked_fill(off, float("nan"))])
    assert all(torch.isfinite(t.grad).all() for t in (k, v, gates))
    assert torch.isfinite(q.grad.masked_select(~off)).all() and torch.all(q.grad.masked_select(off) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key(backend):
    """Queries placed before every key: o = 0, lse = -inf, finite zero gradients for those rows."""
    q, k, v, gates = make_inputs(1, 24, 24, 2, 2, 16, torch.float32, active=1.0)
    o, lse, (dq, dk, dv, dg) = check_against_reference(backend, q, k, v, gates, q_offset=0, k_offset=10)
    assert torch.all(o[:, :10] == 0) and torch.all(torch.isneginf(lse[:, :, :10]))
    assert torch.all(dq[:, :10] == 0) and torch.all(dg[:, :10] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q/k/v as views of one packed projection (strided seq and head dims)."""
    b, s, h, hkv, d = 1, 33, 4, 2, 16
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, dtype=torch.bfloat16)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in (q, k, v))
    gates = (torch.rand(b, s, h) * (torch.rand(b, s, h) < 0.5)).to(torch.bfloat16)
    assert not q.is_contiguous()
    check_against_reference(backend, q, k, v, gates)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_equals_nonzero_gates(backend):
    q, k, v, gates = make_inputs(2, 50, 50, 6, 2, 16, torch.float32, active=0.4)
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]
    with count_computed_pairs() as c:
        o, lse = moh_attention(*leaves, return_lse=True, backend=backend)
        assert c.forward == int((gates > 0).sum()) and c.backward == 0
        (o.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    assert c.forward == c.backward == int((gates > 0).sum())
    assert 0 < c.forward < gates.numel()
    with count_computed_pairs() as c2:  # gradient only towards the gates still visits exactly the active rows
        moh_attention(q.detach(), k.detach(), v.detach(), gates, backend=backend).sum().backward()
    assert c2.forward == c2.backward == int((gates > 0).sum())
    assert c.forward == int((gates > 0).sum())  # closed counters stop counting


def test_auto_backend_runs_triton_under_interpreter():
    q, k, v, gates = make_inputs(1, 16, 16, 2, 1, 16, torch.float32)
    torch.testing.assert_close(moh_attention(q, k, v, gates), moh_attention(q, k, v, gates, backend="triton"))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(gates=a["gates"][:, :-1]), "gates must have shape"),
    (lambda a: a.update(gates=a["gates"][..., None]), "gates must have 3 dims"),
    (lambda a: a.update(gates=-a["gates"] - 1), "gates must be >= 0"),
    (lambda a: a.update(gates=a["gates"].masked_fill(a["gates"] == a["gates"].max(), float("nan"))), "not NaN"),
    (lambda a: a.update(gates=a["gates"].half()), "gates dtype"),
    (lambda a: a.update(gates=a["gates"].to("meta")), "gates is on meta"),
    (lambda a: a.update(k=torch.randn(1, 8, 4, 16, dtype=torch.bfloat16), v=torch.randn(1, 8, 4, 16, dtype=torch.bfloat16)),
     "must divide num_heads"),
    (lambda a: a.update(k_offset=1.5), "k_offset must be a Python int"),
    (lambda a: a.update(q_offset=True), "q_offset must be a Python int"),
    (lambda a: a.update(sm_scale=-1.0), "sm_scale"),
    (lambda a: a.update(causal=1), "causal must be a bool"),
    (lambda a: a.update(backend="cuda"), "backend must be one of"),
])
def test_bad_input(mutate, match):
    q, k, v, gates = make_inputs(1, 8, 8, 6, 3, 16, torch.bfloat16)
    args = dict(q=q, k=k, v=v, gates=gates)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        moh_attention(**args)


def test_torch_fallback_row_chunks(monkeypatch):
    """The fallback chunks gathered rows by token blocks; causal chunks stop at the block end."""
    from seqpar.kernels.moh import torch_impl

    monkeypatch.setattr(torch_impl, "TOKEN_BLOCK", 8)
    q, k, v, gates = make_inputs(2, 45, 45, 4, 2, 16, torch.bfloat16)
    check_against_reference("torch", q, k, v, gates)
    check_against_reference("torch", q[:, 20:], k, v, gates[:, 20:], q_offset=20)


def test_active_row_lists_without_a_sort():
    """build_active_rows (prefix-count scatter) lists each head's active rows first, ascending,
    exactly as a stable sort on 'inactive' would; counts and prefix match the gates."""
    from seqpar.kernels.moh.rows import build_active_rows

    for frac in (0.0, 0.3, 1.0):
        gates = (torch.rand(2, 37, 5) < frac).float() * torch.rand(2, 37, 5)
        act = build_active_rows(gates)
        active = (gates > 0).permute(0, 2, 1).reshape(10, 37)
        expect = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices
        assert torch.equal(act.counts, active.sum(-1).int())
        for bh in range(10):
            n = int(act.counts[bh])
            assert torch.equal(act.rows[bh, :n].long(), expect[bh, :n])
        assert torch.equal(act.prefix[:, 1:], active.cumsum(-1).int())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_documents(backend, causal):
    """Packed documents (cu_seqlens): a query sees only its document's keys; the reference with
    cu_seqlens equals each document run alone (lse included). Documents of 1 token, shorter than a
    tile and spanning tiles; a document whose rows are all inactive for a head."""
    cu = torch.tensor([0, 1, 6, 40, 41, 59], dtype=torch.int32)
    q, k, v, gates = make_inputs(1, 59, 59, 4, 2, 16, torch.bfloat16)
    gates[:, 41:, 2] = 0
    check_against_reference(backend, q, k, v, gates, causal=causal, cu_seqlens=cu)
    o, lse = moh_attention_ref(q.double(), k.double(), v.double(), gates.double(), causal=causal, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o1, l1 = moh_attention_ref(*(t[:, a:b].double() for t in (q, k, v, gates)), causal=causal)
        assert torch.allclose(o[:, a:b], o1) and torch.equal(torch.isinf(lse[:, :, a:b]), torch.isinf(l1))
    with pytest.raises(ValueError, match="cannot be combined with cu_seqlens"):
        moh_attention(q, k, v, gates, cu_seqlens=cu, q_offset=0, backend=backend)
    with pytest.raises(ValueError, match="strictly increasing"):
        moh_attention(q, k, v, gates, cu_seqlens=torch.tensor([0, 6, 6, 59], dtype=torch.int32), backend=backend)
