"""seqpar.megatron pieces on one process: layer_specs tiling and pipeline offsets, the core-attention
contract ([s, b, h, d] in with GQA unexpanded, [s, b, h*d] out; THD [t, h, d] with cu_seqlens) against
the fp64 reference, and the CPU shim being explicit and reversible."""

from __future__ import annotations

import pytest
import torch

from cp_harness import run_ranks
from tolerance import assert_rel_close

from seqpar.kernels import S2Layout
from seqpar.kernels.s2.reference import attention_reference


def _config(**kw):
    from seqpar.megatron import SeqparTransformerConfig

    base = dict(num_layers=4, hidden_size=48, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=64,
                kv_channels=8, attention_dropout=0.0, hidden_dropout=0.0, seqpar_backend="torch",
                s2_block_size=16, s2_local_blocks=1, s2_vert_stride=2, use_cpu_initialization=True)
    base.update(kw)
    return SeqparTransformerConfig(**base)


def _core(cls, config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    pg = ProcessGroupCollection(tp=None, cp=None)
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", pg_collection=pg)


def test_layer_specs_tile_pattern_with_offsets():
    from seqpar.megatron import layer_pattern, layer_specs
    from seqpar.megatron.attention import LightningSelfAttention, MoHSelfAttention, S2CoreAttention, SoftmaxCoreAttention

    assert layer_pattern("LLLA", 10) == "LLLALLLALL"
    block = layer_specs("ASLH", 6, offset=2, count=3)
    assert len(block.layer_specs) == 3
    attn = [s.submodules.self_attention for s in block.layer_specs]
    assert attn[0].module is LightningSelfAttention          # layer 2 = L
    assert attn[1].module is MoHSelfAttention                 # layer 3 = H
    assert attn[2].submodules.core_attention is SoftmaxCoreAttention  # layer 4 = A
    assert layer_specs("S", 1).layer_specs[0].submodules.self_attention.submodules.core_attention is S2CoreAttention
    with pytest.raises(ValueError, match="unknown kind letter"):
        layer_specs("AXL", 4)
    with pytest.raises(ValueError, match="offset"):
        layer_specs("A", 4, offset=3, count=2)


def _qkv(s, b, dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(s, b, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, 2, 8, generator=g, dtype=torch.float64)
    return q, k, v


def _bshd(x):
    return x.transpose(0, 1)


@pytest.mark.parametrize("kind", ["softmax", "s2"])
def test_core_attention_contract_matches_fp64_reference(kind):
    from seqpar.megatron import S2CoreAttention, SoftmaxCoreAttention

    cfg = _config()
    core = _core(SoftmaxCoreAttention if kind == "softmax" else S2CoreAttention, cfg)
    layout = S2Layout(block_size=16, local_blocks=1, vert_stride=2) if kind == "s2" else None
    s, b = 48, 2
    q, k, v = _qkv(s, b, torch.float64)
    ours = core(q.float(), k.float(), v.float(), None)
    assert ours.shape == (s, b, 6 * 8)
    ref = {dt: attention_reference(*(_bshd(t.to(dt)) for t in (q, k, v)), layout=layout)[0] for dt in (torch.float32, torch.float64)}
    flat = {dt: r.transpose(0, 1).reshape(s, b, -1) for dt, r in ref.items()}
    assert_rel_close(kind, ours, flat[torch.float32], flat[torch.float64])


def test_packed_thd_passes_cu_seqlens():
    from megatron.core.packed_seq_params import PackedSeqParams

    from seqpar.megatron import SoftmaxCoreAttention

    core = _core(SoftmaxCoreAttention, _config())
    q, k, v = (t[:, 0] for t in _qkv(37, 1, torch.float64))   # THD: [t, h, d]
    cu = torch.tensor([0, 11, 37], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=26, max_seqlen_kv=26)
    ours = core(q.float(), k.float(), v.float(), None, packed_seq_params=psp)
    assert ours.shape == (37, 48)
    ref = {dt: attention_reference(*(t.to(dt)[None] for t in (q, k, v)), cu_seqlens=cu)[0][0].reshape(37, -1)
           for dt in (torch.float32, torch.float64)}
    assert_rel_close("thd", ours, ref[torch.float32], ref[torch.float64])
    # documents are independent: the second one alone gives the same rows
    alone = core(q[11:].float(), k[11:].float(), v[11:].float(), None)
    torch.testing.assert_close(ours[11:], alone, rtol=1e-5, atol=1e-6)


def test_core_attention_rejects_dropout_and_bias():
    from seqpar.megatron import SoftmaxCoreAttention

    with pytest.raises(ValueError, match="attention_dropout"):
        _core(SoftmaxCoreAttention, _config(attention_dropout=0.1))
    core = _core(SoftmaxCoreAttention, _config())
    q, k, v = (t.float() for t in _qkv(8, 1, torch.float64))
    with pytest.raises(ValueError, match="attention_bias"):
        core(q, k, v, None, attention_bias=torch.zeros(1))


def test_config_fields_validated():
    with pytest.raises(ValueError, match=r"cp_schemes\['s2'\]"):
        _config(cp_schemes={"s2": "teleport"})
    with pytest.raises(ValueError, match="seqpar_backend"):
        _config(seqpar_backend="cuda")


def test_cpu_compat_is_explicit_and_reversible():
    import seqpar.megatron  # noqa: F401  importing changes nothing
    from megatron.core.tensor_parallel import random as tp_random

    from seqpar.megatron import disable_cpu_compat, enable_cpu_compat
    from seqpar.megatron.cpu_compat import CpuRNGStatesTracker

    orig = torch.cuda.current_device
    tracker = tp_random._CUDA_RNG_STATE_TRACKER
    assert not isinstance(tracker, CpuRNGStatesTracker)
    enable_cpu_compat()
    try:
        assert torch.cuda.current_device() == "cpu"
        t = tp_random.get_cuda_rng_tracker()
        assert isinstance(t, CpuRNGStatesTracker)
        t.add("x", 5)
        before = torch.get_rng_state()
        with t.fork("x"):
            a = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)  # forking leaves the default stream alone
        torch.manual_seed(5)
        assert torch.equal(a, torch.rand(3))
    finally:
        disable_cpu_compat()
    assert torch.cuda.current_device is orig
    assert tp_random._CUDA_RNG_STATE_TRACKER is tracker


def test_moh_core_attention_query_router_aux_loss_reaches_router():
    from seqpar.megatron import MoHCoreAttention
    from seqpar.kernels.moh.reference import moh_attention_ref

    core = _core(MoHCoreAttention, _config(moh_num_shared_heads=2, moh_top_k=2))
    q, k, v = (t.float().requires_grad_() for t in _qkv(24, 2, torch.float64))
    out = core(q, k, v, None)
    assert out.shape == (24, 2, 48)
    routing = core.router(_bshd(q).reshape(2, 24, -1))
    assert ((routing.gates > 0).sum(-1) == 4).all()  # 2 shared + top-2 routed of 6 heads
    ref = moh_attention_ref(*(_bshd(t.detach()).double() for t in (q, k, v)), routing.gates.detach().double())[0]
    torch.testing.assert_close(out.double(), ref.transpose(0, 1).reshape(24, 2, -1), rtol=1e-4, atol=1e-5)
    assert core.last_aux_loss > 0
    # the balance loss reaches the router even with a zero main-loss gradient (MoEAuxLossAutoScaler)
    out.mul(0).sum().backward()
    assert core.router.w_routed.weight.grad.abs().sum() > 0


def _packed_gpt(rank: int, world: int):
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    init_parallel(1, 1)
    p = replace(preset("tiny"), pattern="ASLH")
    model = build_gpt(p, transformer_config(p, seqpar_backend="torch", s2_block_size=16), vocab_size=96,
                      max_sequence_length=64)
    ids = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=28, max_seqlen_kv=28)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    packed = model(ids, pos, None, labels=ids, packed_seq_params=psp)
    docs = [model(ids[:, a:b], torch.arange(b - a)[None], None, labels=ids[:, a:b]) for a, b in ((0, 20), (20, 48))]
    parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return packed.detach(), torch.cat(docs, dim=1).detach()


def test_gpt_packed_thd_equals_documents_alone():
    # packed_seq_params (THD) reach every kind's kernel as cu_seqlens: RoPE, softmax, S2, lightning
    # and MoH (gates with their tokens) restart at each document boundary
    packed, docs = run_ranks(_packed_gpt, 1)[0]
    assert packed.shape == (1, 48)
    torch.testing.assert_close(packed, docs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ masks and cp_comm_type (issue 10 item 4)
def _core_kw(cls, config, **kw):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    kw.setdefault("attn_mask_type", AttnMaskType.causal)
    return cls(config, layer_number=1, attention_type="self",
               pg_collection=ProcessGroupCollection(tp=None, cp=None), **kw)


@pytest.mark.parametrize("kind", ["softmax", "s2", "moh"])
def test_core_attention_refuses_padding_masks(kind):
    from megatron.core.transformer.enums import AttnMaskType

    from seqpar.megatron import MoHCoreAttention, S2CoreAttention, SoftmaxCoreAttention

    cls = {"softmax": SoftmaxCoreAttention, "s2": S2CoreAttention, "moh": MoHCoreAttention}[kind]
    # padding_causal used to be accepted and its attention_mask never read
    with pytest.raises(ValueError, match="padding_causal is not supported"):
        _core_kw(cls, _config(), attn_mask_type=AttnMaskType.padding_causal)
    core = _core_kw(cls, _config())
    q, k, v = (t.float() for t in _qkv(16, 2, torch.float64))
    pad = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
    pad[0, ..., 12:] = True
    with pytest.raises(ValueError, match=r"attention_mask \(2, 1, 1, 16\)"):
        core(q, k, v, pad)
    with pytest.raises(ValueError, match="padding_causal"):
        core(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal)
    assert core(q, k, v, None).shape == (16, 2, 48)


def test_cp_comm_type_is_mapped_to_the_scheme_or_refused():
    from seqpar.megatron import SoftmaxCoreAttention
    from seqpar.megatron.layout_check import MEGATRON_CP_COMM

    for name, scheme in MEGATRON_CP_COMM.items():
        extra = {"context_parallel_size": 2, "usp_ulysses_degree": 2} if scheme == "usp" else {}
        core = _core_kw(SoftmaxCoreAttention, _config(cp_schemes={"softmax": scheme}, **extra), cp_comm_type=name)
        assert core.scheme == scheme
    assert _core_kw(SoftmaxCoreAttention, _config(), cp_comm_type=None).scheme == "allgather"
    # used to be dropped: the layer ran cp_schemes' allgather while megatron asked for a2a
    with pytest.raises(ValueError, match=r"cp_comm_type='a2a' .*'ulysses'.*cp_schemes\['softmax'\]='allgather'"):
        _core_kw(SoftmaxCoreAttention, _config(), cp_comm_type="a2a")
    with pytest.raises(ValueError, match="cp_comm_type='ring' is not one of megatron-core's"):
        _core_kw(SoftmaxCoreAttention, _config(), cp_comm_type="ring")


def _mask_layers(rank: int, world: int):
    from dataclasses import replace

    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from seqpar.megatron import LightningSelfAttention, LightningSubmodules, disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    init_parallel(1, 1)
    errors = {}
    try:
        cfg = _config()
        sub = LightningSubmodules(linear_qkvg=ColumnParallelLinear, linear_proj=RowParallelLinear)
        for key, kw in (("ctor", dict(attn_mask_type=AttnMaskType.padding_causal)), ("comm", dict(cp_comm_type="p2p"))):
            try:
                LightningSelfAttention(cfg, sub, 1, **kw)
            except ValueError as e:
                errors[key] = str(e)
        layer = LightningSelfAttention(cfg, sub, 1)
        x = torch.randn(16, 2, 48)
        try:
            layer(x, torch.zeros(2, 1, 1, 16, dtype=torch.bool))
        except ValueError as e:
            errors["lightning_fwd"] = str(e)
        assert layer(x, None)[0].shape == (16, 2, 48)
        for pattern in ("A", "S", "L", "H"):
            p = replace(preset("tiny"), pattern=pattern)
            model = build_gpt(p, transformer_config(p, seqpar_backend="torch"), vocab_size=64, max_sequence_length=32)
            ids = torch.randint(0, 64, (2, 32))
            mask = torch.ones(2, 1, 32, 32, dtype=torch.bool).triu(1)  # megatron's causal mask (True = masked)
            try:
                model(ids, torch.arange(32)[None].expand(2, -1), mask, labels=ids)
            except ValueError as e:
                errors[f"gpt_{pattern}"] = str(e)
    finally:
        parallel_state.destroy_model_parallel()
        disable_cpu_compat()
    return errors


def test_lightning_and_gpt_refuse_masks_they_would_not_read():
    errors = run_ranks(_mask_layers, 1)[0]
    assert "padding_causal is not supported" in errors["ctor"]
    assert "cp_comm_type='p2p'" in errors["comm"] and "cp_schemes['lightning']='allgather'" in errors["comm"]
    assert "LightningSelfAttention: got an attention_mask (2, 1, 1, 16)" in errors["lightning_fwd"]
    for pattern in "ASLH":   # through megatron-core's GPTModel / TransformerBlock
        assert "attention_mask (2, 1, 32, 32)" in errors[f"gpt_{pattern}"], pattern


# ------------------------------------------------ layout checks before any process group (item 13)
_TINY = dict(num_layers=4, num_attention_heads=4, num_query_groups=2)


@pytest.mark.parametrize("kw, match", [
    (dict(pattern="A", tensor_parallel=4), r"parallel.tensor_parallel=4 must divide the 4 query heads and the 2 kv"),
    (dict(pattern="A", pipeline_parallel=3), r"parallel.pipeline_parallel=3 must divide the 4 layers"),
    (dict(pattern="A", context_parallel=2, seq_len=66), r"data.seq_len=66 must be a multiple of 2 x "),
    (dict(pattern="L", context_parallel=8, cp_schemes={"lightning": "ulysses"}), r"cp_schemes.lightning='ulysses'"),
    (dict(pattern="A", context_parallel=4, cp_schemes={"softmax": "usp"}, usp_ulysses_degree=3), r"must divide"),
    (dict(pattern="AX"), r"model.pattern='AX'"),
    (dict(pattern="SA", context_parallel=2, seq_len=64, cp_schemes={"softmax": "ulysses"}, s2_head_placement="contiguous"),
     r"parallel.s2_head_placement='contiguous' is read only by S2 layers under the 'ulysses' / 'usp'"),
])
def test_check_layout_refuses_bad_layouts_naming_the_field(kw, match):
    from seqpar.megatron import check_layout

    import torch.distributed as dist
    assert not dist.is_initialized()   # a pure function: no process group needed
    with pytest.raises(ValueError, match=match):
        check_layout(**{**_TINY, **kw})


def test_check_layout_accepts_runnable_layouts_and_lists_every_problem():
    from seqpar.megatron import check_layout
    from seqpar.megatron.layout_check import MEGATRON_NAMES

    check_layout(pattern="ASLH", context_parallel=2, seq_len=64, **_TINY)
    check_layout(pattern="ASL", tensor_parallel=2, context_parallel=2, seq_len=64, **_TINY)
    # S2 under TP x CP is exact for any stride (kv-head offsets through cp.attention; test_cp_tp_s2.py)
    check_layout(pattern="S", tensor_parallel=2, context_parallel=2, seq_len=64, **_TINY)
    check_layout(pattern="S", context_parallel=2, seq_len=64, cp_schemes={"s2": "ulysses"},
                 s2_head_placement="contiguous", **_TINY)
    check_layout(pattern="AL", context_parallel=4, cp_schemes={"softmax": "ulysses", "lightning": "usp"},
                 usp_ulysses_degree=2, seq_len=64, **_TINY)   # 2 kv heads, CP 4: kv heads replicated
    with pytest.raises(ValueError) as e:
        check_layout(pattern="SH", tensor_parallel=3, pipeline_parallel=3, **_TINY)
    assert len(str(e.value).splitlines()) == 2   # both problems, one line each
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4"):
        check_layout(pattern="A", tensor_parallel=4, names=MEGATRON_NAMES, **_TINY)


# ------------------------------------------------ TP-invariant initialisation (item 13)
def _step1_losses(rank: int, world: int, patterns: tuple):
    from dataclasses import replace

    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.models import build_gpt, preset, transformer_config

    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(5))
    out = {}
    try:
        for pattern in patterns:
            for tp in (1, 2):
                init_parallel(tp, 1, seed=11)
                p = replace(preset("tiny"), pattern=pattern)   # 4 heads, 2 kv heads
                # vert_stride 4: DKernel step 1 for the model's 4 heads, 2 for a TP rank's 2 heads
                cfg = transformer_config(p, tensor_model_parallel_size=tp, seqpar_backend="torch",
                                         s2_block_size=16, s2_local_blocks=1, s2_vert_stride=4)
                torch.manual_seed(11)
                model = build_gpt(p, cfg, vocab_size=96, max_sequence_length=32)
                with torch.no_grad():
                    loss = model(ids, torch.arange(32)[None].expand(2, -1), None, labels=ids).mean()
                out[(pattern, tp)] = float(loss)
                parallel_state.destroy_model_parallel()
    finally:
        disable_cpu_compat()
    return out


def test_same_seed_tp1_and_tp2_give_the_same_step1_loss():
    # every kind that runs under TP (MoH needs TP=1): the TP=2 model is the TP=1 model. Lightning
    # used to differ (each rank read its contiguous chunk of [q|k|v|gate] as its own q/k/v/gate)
    patterns = ("A", "S", "L", "ASL")
    for res in run_ranks(_step1_losses, 2, patterns, timeout=300):
        for pattern in patterns:
            assert res[(pattern, 2)] == pytest.approx(res[(pattern, 1)], rel=1e-6, abs=0), pattern


def test_recipe_validation_runs_the_layout_check_before_any_process_group():
    import pathlib

    import torch.distributed as dist

    from seqpar.train.config import load_recipe

    recipe = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "tiny_hybrid_cp2.yaml"
    with pytest.raises(ValueError, match=r"parallel.tensor_parallel=3 must divide the 4 query heads"):
        load_recipe(recipe, ["model.pattern=AS", "parallel.tensor_parallel=3"])
    with pytest.raises(ValueError, match=r"cp_schemes.lightning='ulysses' needs the 2 query heads per TP rank"):
        load_recipe(recipe, ["model.pattern=AL", "parallel.tensor_parallel=2", "parallel.cp_schemes.lightning=ulysses",
                             "parallel.context_parallel=4"])
    load_recipe(recipe, ["model.pattern=AS", "parallel.tensor_parallel=2", "model.s2_vert_stride=4"])
    assert not dist.is_initialized()
