"""Lightning final state of padded documents (``cp.pad_varlen``): with the real boundaries
(``cu_seqlens_unpadded``) the final state is each document's state after its last *real* token —
not decayed through the pads — with exact gradients, for the single-rank op on padded input and
under every CP scheme that takes varlen (LASP-2 = allgather, Ulysses), against the fp64 reference
on the unpadded documents. Documents are awkward: lengths 1, 5, 13 (pads of up to 2P - 1 tokens,
so a pad can cover whole chunks of a document)."""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from seqpar import cp
from seqpar.kernels import lightning_attention
from seqpar.kernels.lightning.reference import lightning_reference
from tolerance import GRAD_FACTOR, assert_rel_close

DOCS = [1, 5, 13]
H, HKV, D = 4, 2, 8


def _data(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = sum(DOCS)
    return {"q": torch.randn(1, n, H, D, generator=g) * 0.5, "k": torch.randn(1, n, HKV, D, generator=g) * 0.5,
            "v": torch.randn(1, n, HKV, D, generator=g), "go": torch.randn(1, n, H, D, generator=g),
            "init": torch.randn(len(DOCS), H, D, D, generator=g) * 0.3,
            "gf": torch.randn(len(DOCS), H, D, D, generator=g),
            "slope": torch.linspace(0.05, 1.5, H),
            "cu": torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)}


def _reference(t: dict, dtype: torch.dtype):
    """The op on the unpadded documents: fp64 reference (dtype float64) or the same reference in fp32."""
    leaves = {n: t[n].to(dtype).clone().requires_grad_() for n in ("q", "k", "v", "init")}
    o, final = lightning_reference(leaves["q"], leaves["k"], leaves["v"], t["slope"].to(dtype),
                                   initial_state=leaves["init"], cu_seqlens=t["cu"])
    loss = (o.double() * t["go"].double()).sum() + (final.double() * t["gf"].double()).sum()
    loss.backward()
    return o.detach(), final.detach(), {n: x.grad for n, x in leaves.items()}


def _check(name, o, final, grads, t):
    o64, f64, g64 = _reference(t, torch.float64)
    o32, f32, g32 = _reference(t, torch.float32)
    assert_rel_close(f"{name} out", o, o32, o64)
    assert_rel_close(f"{name} final_state", final, f32, f64)
    for n in ("q", "k", "v", "init"):
        assert_rel_close(f"{name} d{n}", grads[n], g32[n], g64[n], factor=GRAD_FACTOR)


def _pad_positions(pad) -> torch.Tensor:
    starts = pad.cu_seqlens.tolist()
    real = pad.original_cu_seqlens.tolist()
    return torch.cat([torch.arange(starts[i] + real[i + 1] - real[i], starts[i + 1]) for i in range(len(real) - 1)])


def _padded_loss(o_pad, final, pad, t):
    o = cp.unpad_varlen(o_pad, pad)
    return (o.double() * t["go"].double()).sum() + (final.double() * t["gf"].double()).sum()


def test_single_rank_padded_final_state_is_last_real_token():
    t = _data()
    for multiple in (2, 4, 8):
        leaves = {n: t[n].clone().requires_grad_() for n in ("q", "k", "v", "init")}
        pads = [cp.pad_varlen(leaves[n], t["cu"], multiple) for n in ("q", "k", "v")]
        o_pad, final = lightning_attention(pads[0].x, pads[1].x, pads[2].x, t["slope"], initial_state=leaves["init"],
                                           output_final_state=True, cu_seqlens=pads[0].cu_seqlens,
                                           cu_seqlens_unpadded=t["cu"], backend="torch")
        assert bool((o_pad[:, _pad_positions(pads[0])] == 0).all())  # pad outputs are 0
        _padded_loss(o_pad, final, pads[0], t).backward()
        _check(f"single rank, multiple {multiple}", cp.unpad_varlen(o_pad, pads[0]).detach(), final.detach(),
               {n: x.grad for n, x in leaves.items()}, t)
    # without the real boundaries the state keeps decaying through the pads (documented)
    pads = [cp.pad_varlen(t[n], t["cu"], 8) for n in ("q", "k", "v")]
    _, decayed = lightning_attention(pads[0].x, pads[1].x, pads[2].x, t["slope"], initial_state=t["init"],
                                     output_final_state=True, cu_seqlens=pads[0].cu_seqlens, backend="torch")
    assert not torch.allclose(decayed, _reference(t, torch.float64)[1].float(), atol=1e-3)


def _cp_job(rank: int, world: int, schemes: tuple) -> dict:
    t = _data()
    out = {}
    for scheme in schemes:
        leaves = {n: t[n].clone().requires_grad_() for n in ("q", "k", "v", "init")}
        pads = [cp.pad_varlen(leaves[n], t["cu"], 2 * world) for n in ("q", "k", "v")]
        cu_pad = pads[0].cu_seqlens
        loc = [cp.shard_varlen(p.x, cu_pad, None)[0] for p in pads]
        o, final = cp.attention(*loc, kind="lightning", scheme=scheme, slope=t["slope"], initial_state=leaves["init"],
                                output_final_state=True, cu_seqlens=cu_pad, cu_seqlens_unpadded=t["cu"],
                                backend="torch")
        o_pad = cp.unshard_varlen(o, cu_pad, None)
        # unshard_varlen's gradient is this rank's shard (count the output once); the replicated
        # final state is counted once over the group
        o_u = cp.unpad_varlen(o_pad, pads[0])
        loss = (o_u.double() * t["go"].double()).sum() + (final.double() * t["gf"].double()).sum() / world
        loss.backward()
        out[scheme] = {"o": o_u.detach(), "final": final.detach(),
                       "pad_out": o_pad.detach()[:, _pad_positions(pads[0])].abs().sum(),
                       "grads": {n: x.grad for n, x in leaves.items()}}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_cp_padded_final_state_is_last_real_token(world):
    schemes = ("allgather", "ulysses")
    results = run_ranks(_cp_job, world, schemes, timeout=300)
    t = _data()
    for scheme in schemes:
        r0 = results[0][scheme]
        grads = {n: sum(r[scheme]["grads"][n] for r in results) for n in ("q", "k", "v", "init")}
        _check(f"{scheme} P={world}", r0["o"], r0["final"], grads, t)
        assert float(r0["pad_out"]) == 0.0
        for r in results:
            torch.testing.assert_close(r[scheme]["final"], r0["final"])


def test_bad_unpadded_boundaries_name_the_field():
    t = _data()
    pad = cp.pad_varlen(t["q"], t["cu"], 4)
    q, k, v = pad.x, cp.pad_varlen(t["k"], t["cu"], 4).x, cp.pad_varlen(t["v"], t["cu"], 4).x
    with pytest.raises(ValueError, match="cu_seqlens_unpadded needs cu_seqlens"):
        lightning_attention(q, k, v, t["slope"], cu_seqlens_unpadded=t["cu"], backend="torch")
    with pytest.raises(ValueError, match="document 0: 9 real tokens, padded length 4"):
        lightning_attention(q, k, v, t["slope"], cu_seqlens=pad.cu_seqlens, backend="torch",
                            cu_seqlens_unpadded=torch.tensor([0, 9, 10, 19], dtype=torch.int32))
    with pytest.raises(ValueError, match="as many documents as cu_seqlens"):
        cp.attention(q, k, v, kind="lightning", group=(0, 1), slope=t["slope"], cu_seqlens=pad.cu_seqlens,
                     cu_seqlens_unpadded=torch.tensor([0, 19], dtype=torch.int32))
