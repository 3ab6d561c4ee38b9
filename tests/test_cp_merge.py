"""merge_partials vs softmax over the concatenated keys (fwd + grads incl. lse), -inf rows, and
the decayed linear-attention state prefix vs a sequential scan of S_t = λ S_{t-1} + k_tᵀ v_t."""

from __future__ import annotations

import pytest
import torch

from seqpar import cp
from tolerance import GRAD_FACTOR, assert_rel_close


def _attn_lse(q, k, v, mask):
    """Plain softmax attention over keys where mask is True: o [b,s,h,d], lse [b,h,s]."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return o, lse


def _split_then_merge(q, k, v, bounds, mask):
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = torch.zeros_like(mask)
        m[..., a:b] = mask[..., a:b]
        o, l = _attn_lse(q, k, v, m)
        outs.append(o.to(q.dtype))
        lses.append(l.float())
    return cp.merge_partials(outs, lses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_softmax_over_concatenation(dtype):
    b, s, h, d, nk = 2, 7, 3, 5, 13
    mask = torch.rand(b, h, s, nk) < 0.6
    mask[..., 0] = True  # every row sees something (empty rows are tested below)
    bounds = [0, 4, 5, 13]
    q64, k64, v64 = (torch.randn(b, n, h, d, dtype=torch.float64) for n in (s, nk, nk))
    go, gl = torch.randn(b, s, h, d, dtype=torch.float64), torch.randn(b, h, s, dtype=torch.float64)

    def run(fn, dt):
        q, k, v = (t.detach().to(dt).clone().requires_grad_() for t in (q64, k64, v64))
        o, l = fn(q, k, v)
        ((o.double() * go).sum() + (l.double() * gl).sum()).backward()
        return o, l, q.grad, k.grad, v.grad

    ref64 = run(lambda q, k, v: _attn_lse(q, k, v, mask), torch.float64)
    ref_lp = run(lambda q, k, v: _attn_lse(q, k, v, mask), dtype)
    ours = run(lambda q, k, v: _split_then_merge(q, k, v, bounds, mask), dtype)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        factor = 2.0 if i < 2 else GRAD_FACTOR
        assert_rel_close(name, ours[i], ref_lp[i], ref64[i], factor=factor,
                         atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_merge_grads_reach_lse_exactly():
    # d lse / d lse_i = softmax weights; d out / d lse_i = w_i (o_i - out)
    o = [torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    l = [torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out, lse = cp.merge_partials(o, l)
    torch.autograd.backward([out.sum(), lse.sum()])
    L = torch.stack(l)
    w = torch.softmax(L.double(), 0)
    O = torch.stack(o).detach()
    out64 = (w.transpose(2, 3)[..., None] * O).sum(0)
    for i in range(3):
        wi = w[i].transpose(1, 2)[..., None]
        expect = wi.squeeze(-1) * ((O[i] - out64).sum(-1)) + wi.squeeze(-1)
        assert torch.allclose(l[i].grad, expect.transpose(1, 2), atol=1e-5)
        assert torch.allclose(o[i].grad, wi.expand_as(O[i]).double(), atol=1e-6)


def test_merge_handles_empty_rows_without_nan():
    b, s, h, d = 1, 4, 2, 3
    o1 = torch.randn(b, s, h, d, requires_grad=True)
    o2 = torch.full((b, s, h, d), float("nan")).requires_grad_()  # garbage where lse = -inf
    l1 = torch.randn(b, h, s)
    l1[0, 0, 1] = float("-inf")           # row seen by nobody
    l1 = l1.requires_grad_()
    l2 = torch.full((b, h, s), float("-inf"), requires_grad=True)
    out, lse = cp.merge_partials([o1, o2], [l1, l2])
    assert torch.isfinite(out).all()
    assert lse[0, 0, 1] == float("-inf") and torch.equal(out[0, 1, 0], torch.zeros(d))
    assert torch.allclose(out[0, :, 1], o1[0, :, 1]) and torch.allclose(lse[0, 1], l1[0, 1])
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (o1, o2, l1, l2):
        assert torch.isfinite(t.grad).all()
    assert (l2.grad == 0).all() and (o2.grad == 0).all()
    # running merge for the ring gives the same answer as the one-shot merge
    run = cp.merge_two(None, None, o1, l1)
    run = cp.merge_two(*run, o2, l2)
    assert torch.equal(run[0], out) and torch.equal(run[1], lse)


def _scan(k, v, slope, init):
    """Sequential S_t = λ S_{t-1} + k_tᵀ v_t; returns every S_t [n, b, h, dk, dv] (fp64)."""
    lam = torch.exp(-slope.double())[None, :, None, None]
    S, states = init.double(), []
    for t in range(k.shape[1]):
        S = lam * S + torch.einsum("bhk,bhv->bhkv", k[:, t].double(), v[:, t].double())
        states.append(S)
    return torch.stack(states)


@pytest.mark.parametrize("lens", [[3, 5, 1, 4], [6, 0, 2], [7]])
def test_decayed_state_prefix_matches_scan(lens):
    b, h, dk, dv = 2, 3, 4, 5
    n = sum(lens)
    k, v = torch.randn(b, n, h, dk, dtype=torch.float64), torch.randn(b, n, h, dv, dtype=torch.float64)
    slope = torch.tensor([0.05, 0.5, 1.3], dtype=torch.float64, requires_grad=True)
    init = torch.randn(b, h, dk, dv, dtype=torch.float64, requires_grad=True)
    # local states: scan of each chunk from zero
    starts = [sum(lens[:i]) for i in range(len(lens))]
    local = []
    for s0, L in zip(starts, lens):
        local.append(_scan(k[:, s0:s0 + L], v[:, s0:s0 + L], slope.detach(), torch.zeros(b, h, dk, dv))[-1]
                     if L else torch.zeros(b, h, dk, dv, dtype=torch.float64))
    M = torch.stack(local).float().requires_grad_()
    prefix, final = cp.decayed_state_prefix(M, lens, slope, init)
    full = _scan(k, v, slope.detach(), init.detach())
    for r, s0 in enumerate(starts):
        want = init.detach().double() * torch.exp(-slope.detach() * s0)[None, :, None, None] if s0 == 0 else full[s0 - 1]
        assert torch.allclose(prefix[r].double(), want, rtol=1e-5, atol=1e-5), r
    assert torch.allclose(final.double(), full[-1], rtol=1e-5, atol=1e-5)
    # gradients: compare with autograd through the fp64 scan-based definition
    gp, gf = torch.randn_like(prefix), torch.randn_like(final)
    (prefix * gp).sum().add((final * gf).sum()).backward()
    M64 = M.detach().double().requires_grad_()
    s64 = slope.detach().clone().requires_grad_()
    i64 = init.detach().clone().requires_grad_()
    lam = torch.exp(-s64)[None, :, None, None]
    S, outs = i64, []
    for j, L in enumerate(lens):  # chunk-level recurrence: S <- λ^L S + M_j
        outs.append(S)
        S = lam ** L * S + M64[j]
    (torch.stack(outs) * gp.double()).sum().add((S * gf.double()).sum()).backward()
    assert torch.allclose(M.grad.double(), M64.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(slope.grad, s64.grad, rtol=1e-4, atol=1e-3)
    assert torch.allclose(init.grad, i64.grad, rtol=1e-4, atol=1e-4)


def test_merge_and_prefix_validate_inputs():
    with pytest.raises(ValueError, match="as many outs as lses"):
        cp.merge_partials([torch.zeros(1, 2, 1, 3)], [])
    with pytest.raises(ValueError, match=r"lse shape .* must be \(batch, heads, seq\)"):
        cp.merge_partials([torch.zeros(1, 2, 1, 3)], [torch.zeros(1, 2, 1)])
    with pytest.raises(ValueError, match="chunk_lens must hold 2"):
        cp.decayed_state_prefix(torch.zeros(2, 1, 1, 2, 2), [3], torch.ones(1))
    with pytest.raises(ValueError, match=r"slope must be \[heads\]"):
        cp.decayed_state_prefix(torch.zeros(2, 1, 1, 2, 2), [3, 3], torch.ones(2))
