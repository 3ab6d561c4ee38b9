"""MoH router and MoHAttention module: top-k, shared heads, gate weights, load-balance loss, grads."""

from __future__ import annotations

import math

import pytest
import torch

from seqpar.kernels.moh import count_computed_pairs, moh_attention_ref
from seqpar.nn import MoHAttention, MoHRouter


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def dot_rows(w: torch.Tensor, x: list[float]) -> list[float]:
    return [sum(wi * xi for wi, xi in zip(row, x)) for row in w.detach().tolist()]


def test_gates_match_hand_computation():
    """5 heads: 2 shared + top-2 of 3 routed, weights set by hand, gates computed in plain Python."""
    router = MoHRouter(3, 5, 2, 2, router_dtype=torch.float64)
    with torch.no_grad():
        router.w_shared.weight.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]))
        router.w_routed.weight.copy_(torch.tensor([[0.3, -1.0, 0.0], [2.0, 0.1, 0.0], [-0.4, 0.7, 1.0]]))
        router.w_mix.weight.copy_(torch.tensor([[0.5, 0.5, 0.0], [-0.2, 0.0, 0.9]]))
    tokens = [[0.5, -0.5, 1.0], [-1.0, 2.0, 0.3], [0.0, 0.2, -0.7]]
    r = router(torch.tensor([tokens], dtype=torch.float64))
    for t, x in enumerate(tokens):
        a1, a2 = (2 * a for a in softmax(dot_rows(router.w_mix.weight, x)))
        shared = [2 * p * a1 for p in softmax(dot_rows(router.w_shared.weight, x))]
        probs = softmax(dot_rows(router.w_routed.weight, x))
        top = sorted(range(3), key=lambda i: -probs[i])[:2]
        routed = [2 * probs[i] / sum(probs[j] for j in top) * a2 if i in top else 0.0 for i in range(3)]
        expect = torch.tensor(shared + routed, dtype=torch.float64)
        torch.testing.assert_close(r.gates[0, t], expect, rtol=1e-12, atol=1e-12)
        # the paper's sums: shared gates sum to h_s * a1, routed to k * a2, a1 + a2 = 2
        assert math.isclose(float(r.gates[0, t, :2].sum().detach()), 2 * a1, rel_tol=1e-12)
        assert math.isclose(float(r.gates[0, t, 2:].sum().detach()), 2 * a2, rel_tol=1e-12)
        assert math.isclose(a1 + a2, 2.0, rel_tol=1e-12)
        assert sorted(r.topk_index[0, t].tolist()) == sorted(top)


def test_topk_and_shared_always_active():
    router = MoHRouter(16, 8, 3, 2, router_dtype=torch.float64)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    r = router(x)
    assert r.gates.dtype == torch.float64 and r.gates.shape == (2, 30, 8)
    assert torch.all(r.gates[..., :3] > 0), "shared heads must be on for every token"
    logits = x @ router.w_routed.weight.t()
    want = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.argsort(-1, descending=True)[..., :2], True)
    assert torch.equal(r.gates[..., 3:] > 0, want)
    assert torch.all((r.gates[..., 3:] > 0).sum(-1) == 2)


def test_fp32_router_under_bf16_model():
    m = MoHAttention(32, 4, num_shared_heads=1, top_k=2, backend="torch").to(torch.bfloat16)
    out, aux = m(torch.randn(1, 5, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert m.last_routing.gates.dtype == torch.float32 and aux.dtype == torch.float32


def test_balance_loss_hand_example():
    """E = 3 routed heads, top-1; one-hot tokens make the probabilities 3/5, 1/5, 1/5.

    Tokens A, A, A, B: P = [0.5, 0.3, 0.2], f = [3/4, 1/4, 0],
    L_b = E^2 * mean(P * f) = 9 * (0.375 + 0.075 + 0) / 3 = 1.35.
    """
    router = MoHRouter(2, 3, 0, 1, router_dtype=torch.float64)
    with torch.no_grad():
        router.w_routed.weight.copy_(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)], [0.0, 0.0]],
                                                    dtype=torch.float64))
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # A A | A B
    r = router(x)
    assert math.isclose(float(r.balance_loss.detach()), 1.35, rel_tol=1e-12)
    # no shared heads: the routed top-1 gate is renormalised to 1 * k = 1
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(2, 2, dtype=torch.float64))


def test_grads_reach_router_from_task_and_aux_loss():
    m = MoHAttention(24, 6, num_kv_heads=3, num_shared_heads=2, top_k=2, aux_loss_coef=0.0, backend="torch")
    out, aux = m(torch.randn(2, 9, 24))
    out.square().mean().backward()
    for name, p in m.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    m.zero_grad()
    m.aux_loss_coef = 0.5
    _, aux = m(torch.randn(2, 9, 24))
    aux.backward()
    assert m.router.w_routed.weight.grad.abs().sum() > 0
    torch.testing.assert_close(aux, 0.5 * m.last_routing.balance_loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_module_matches_reference_and_skips(backend):
    torch.manual_seed(1)
    m = MoHAttention(48, 6, num_kv_heads=2, num_shared_heads=1, top_k=3, backend=backend)
    x = torch.randn(2, 21, 48)
    with count_computed_pairs() as c:
        out, _ = m(x)
        out.sum().backward()
    assert c.forward == c.backward == 2 * 21 * (1 + 3)
    b, s = 2, 21
    q = m.q_proj(x).view(b, s, 6, 8).double()
    k = m.k_proj(x).view(b, s, 2, 8).double()
    v = m.v_proj(x).view(b, s, 2, 8).double()
    o, _ = moh_attention_ref(q, k, v, m.last_routing.gates.double())
    want = torch.nn.functional.linear(o.reshape(b, s, 48), m.o_proj.weight.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_active_ratio():
    m = MoHAttention(32, 8, num_shared_heads=2, active_ratio=0.75, backend="torch")
    assert m.top_k == 4 and m.active_fraction == 0.75
    assert MoHAttention(32, 8, backend="torch").active_fraction == 0.75  # the default
    dense = MoHAttention(32, 4, num_shared_heads=4, top_k=0, backend="torch")
    out, aux = dense(torch.randn(1, 3, 32))
    assert float(aux) == 0.0 and torch.all(dense.last_routing.gates > 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_shared_heads=2, top_k=3), r"top_k \(3\) > routed heads \(2"),
    (dict(num_shared_heads=5, top_k=1), "num_shared_heads must be an int in"),
    (dict(num_shared_heads=1, top_k=0), "top_k must be >= 1"),
    (dict(top_k=2, active_ratio=0.5), "either top_k or active_ratio"),
    (dict(active_ratio=0.0), r"active_ratio must be in \(0, 1\]"),
    (dict(num_shared_heads=4, active_ratio=0.25), "leaves no routed head"),
    (dict(num_shared_heads=2, active_ratio=0.5), "leaves no routed head"),
    (dict(num_kv_heads=3, top_k=1), "num_kv_heads"),
    (dict(aux_loss_coef=-0.1, top_k=1), "aux_loss_coef"),
    (dict(router_dtype=torch.bfloat16, top_k=1), "router_dtype"),
    (dict(backend="cuda", top_k=1), "backend must be one of"),
    (dict(causal="yes", top_k=1), "causal must be a bool"),
    (dict(num_layers=0, top_k=1), "num_layers"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoHAttention(32, 4, **kwargs)


def test_bad_hidden_size_and_input():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MoHAttention(30, 4, top_k=1)
    with pytest.raises(ValueError, match=r"x must be hidden states \[batch, seq, hidden\]"):
        MoHAttention(32, 4, top_k=1, backend="torch")(torch.randn(5, 32))


def test_module_aux_loss_is_this_layers_share_of_the_layer_average():
    # issue 10 item 12: summed over a model's MoH layers the aux loss is coef x the layer average
    x = torch.randn(2, 9, 24)
    one = MoHAttention(24, 6, num_shared_heads=2, top_k=2, aux_loss_coef=0.01, backend="torch")
    three = MoHAttention(24, 6, num_shared_heads=2, top_k=2, aux_loss_coef=0.01, num_layers=3, backend="torch")
    three.load_state_dict(one.state_dict())
    _, a1 = one(x)
    _, a3 = three(x)
    torch.testing.assert_close(a3, a1 / 3)
    torch.testing.assert_close(a1, 0.01 * one.last_routing.balance_loss)


# ------------------------------------------------------- megatron MoH layers (issue 10 items 9, 12)
def _balance_inputs(rank: int, tokens: int, routed: int = 5, top_k: int = 2):
    g = torch.Generator().manual_seed(10 + rank)
    probs = torch.softmax(torch.randn(1, tokens, routed, generator=g, dtype=torch.float64), -1)
    return probs, probs.topk(top_k, dim=-1).indices


def _balance_ranks(rank: int, world: int):
    import torch.distributed as dist

    from seqpar import cp
    from seqpar.megatron import moh_balance_loss

    sizes = [7, 4, 9, 5][:world]   # uneven token counts per rank
    parts = [_balance_inputs(r, n) for r, n in enumerate(sizes)]
    probs, topk = parts[rank]
    probs = probs.clone().requires_grad_()
    with cp.comm_ledger() as ledger:
        loss = moh_balance_loss(probs, topk, dist.group.WORLD)
    loss.backward()
    full = torch.cat([p for p, _ in parts], dim=1).requires_grad_()
    ref = moh_balance_loss(full, torch.cat([t for _, t in parts], dim=1), None)
    ref.backward()
    start = sum(sizes[:rank])
    return (loss.detach(), ref.detach(), probs.grad, full.grad[:, start:start + sizes[rank]],
            ledger.summary())


def test_balance_loss_reduces_through_comm_and_ledger():
    from cp_harness import run_ranks

    world = 2

    for loss, ref, grad, ref_grad, summary in run_ranks(_balance_ranks, world):
        torch.testing.assert_close(loss, ref)          # the loss over every CP rank's tokens
        torch.testing.assert_close(grad, ref_grad)     # this rank's share of the single-rank gradient
        # one counted all-reduce of [p_sum (5) | f_cnt (5) | tokens (1)] fp64: 2 (P-1)/P x 88 bytes
        assert summary == {"all_reduce": {"bytes": 2 * (world - 1) * 11 * 8 // world, "calls": 1}}


def _moh_models(rank: int, world: int, patterns: tuple, coef: float):
    from dataclasses import replace

    from megatron.core import parallel_state

    from seqpar.megatron import MoHSelfAttention, disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    out = []
    for pattern in patterns:
        init_parallel(1, 1)
        p = replace(preset("tiny"), pattern=pattern)
        model = build_gpt(p, transformer_config(p, seqpar_backend="torch", moh_aux_loss_coef=coef), vocab_size=64,
                          max_sequence_length=32)
        layers = [m for m in model.modules() if isinstance(m, MoHSelfAttention)]
        balance = []
        for m in layers:
            m.router.register_forward_hook(lambda mod, inp, o: balance.append(o.balance_loss.detach()))
        ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
        model(ids, torch.arange(32)[None].expand(2, -1), None, labels=ids)
        out.append((len(layers), torch.stack([m.last_aux_loss for m in layers]), torch.stack(balance)))
        parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return out


def test_megatron_moh_aux_loss_is_coef_times_layer_average():
    from cp_harness import run_ranks

    cases = {"AH": 2, "H": 4, "AAAH": 1}   # tiny preset: 4 layers
    results = run_ranks(_moh_models, 1, tuple(cases), 0.01)[0]
    for (pattern, n_moh), (n, aux, balance) in zip(cases.items(), results):
        assert n == n_moh, pattern
        # what the step sums over layers is coef x mean over layers of L_b (was coef x sum)
        torch.testing.assert_close(aux.sum(), 0.01 * balance.mean(), msg=pattern)
        torch.testing.assert_close(aux, 0.01 * balance / n_moh, msg=pattern)


def test_layer_specs_pass_the_models_moh_layer_count_to_every_stage():
    from seqpar.megatron import layer_specs

    for offset, count in ((0, 6), (2, 3), (5, 1)):
        block = layer_specs("AHH", 6, offset=offset, count=count)
        params = [s.submodules.self_attention.params for s in block.layer_specs]
        assert all(p.get("num_moh_layers") == 4 for p, c in zip(params, "AHHAHH"[offset:offset + count]) if c == "H")
