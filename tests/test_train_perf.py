"""Model FLOPs and MFU (issue 23, item 6): ``seqpar.train.perf`` against torch's own FLOP counter.

``torch.utils.flop_counter.FlopCounterMode`` sees every matmul of a real forward + backward of the tiny
preset of each layer kind (torch attention backend, one process). Outside the attention cores it must
equal ``6 N`` per token exactly (the dense matmuls incl. the LM head, MoH's router and Lightning's
gate). The torch backend's softmax core computes the full ``N x N`` square with FlashAttention-2's
backward (``S`` recomputed): it equals ``kernels.flops``' recompute count over ``N^2`` pairs, and the
model count is that convention's ``N (N + 1) / 2`` causal pairs without the recompute. S2, Lightning
and MoH cores (whose torch backends compute more than the mask needs) are counted by
``kernels.flops``; S2's count is checked against its block mask here as well.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from seqpar.kernels.flops import attention_flops, causal_pairs

SEQ, BATCH, VOCAB = 64, 2, 256


def _recipe(preset: str, **train):
    from seqpar.train.config import from_dict

    return from_dict({
        "model": {"preset": preset, "s2_block_size": 16, "s2_local_blocks": 2, "s2_vert_stride": 4},
        "parallel": {"backend": "torch"},
        "data": {"dataset": "mqar", "seq_len": SEQ, "global_batch": BATCH, "vocab_size": VOCAB},
        "train": {"steps": 1, "progress": False, "out_dir": tempfile.mkdtemp(prefix="seqpar_perf_"), **train},
    })


@pytest.fixture(scope="module")
def counted():
    """{variant: (recipe, FLOPs outside the attention cores, [core FLOPs per layer])} of one counted
    forward + backward of each tiny preset."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.utils.flop_counter import FlopCounterMode

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.runtime import build_model

    init_parallel(1, 1, seed=1, init_method=f"file://{tempfile.mktemp(prefix='seqpar_perf_rdv_')}", rank=0,
                  world_size=1)
    out = {}
    try:
        for variant in ("dense", "s2", "lightning", "moh"):
            cfg = _recipe(f"tiny-{variant}")
            model = build_model(cfg, VOCAB)[0]
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
            pos = torch.arange(SEQ).expand(BATCH, SEQ)
            with FlopCounterMode(display=False, depth=None) as fc:
                model(tokens, pos, None, labels=tokens).sum().backward()
            counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
            cores = []
            for i in range(cfg.model.shape.num_layers):
                attn = f"GPTModel.decoder.layers.{i}.self_attention"
                if f"{attn}.core_attention" in counts:
                    cores.append(counts[f"{attn}.core_attention"])
                else:  # Lightning attends inside the module: all of it but its projections
                    cores.append(counts[attn] - sum(counts[f"{attn}.{lin}"] for lin in ("linear_qkvg", "linear_proj")))
            out[variant] = (cfg, counts["Global"] - sum(cores), cores)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        disable_cpu_compat()
    return out


@pytest.mark.parametrize("variant", ["dense", "s2", "lightning", "moh"])
def test_dense_matmuls_are_6n_per_token(counted, variant):
    from seqpar.train.perf import ModelFlops

    cfg, dense, _ = counted[variant]
    assert dense == 6 * ModelFlops(cfg, VOCAB).n * BATCH * SEQ


def test_softmax_core_is_the_flops_convention(counted):
    """The counter's softmax core (full square, FlashAttention-2 backward) = kernels.flops' recompute count
    over N^2 pairs; the model count is the causal pairs with backward = 2x forward."""
    from seqpar.train.perf import ModelFlops

    cfg, _, cores = counted["dense"]
    mf = ModelFlops(cfg, VOCAB)
    fa2 = attention_flops("softmax", batch=BATCH, seq_len=SEQ, heads=mf.heads, head_dim=mf.head_dim, backward=True)
    assert all(c == fa2 * SEQ * SEQ / causal_pairs(SEQ) for c in cores)
    fwd = attention_flops("softmax", batch=1, seq_len=SEQ, heads=mf.heads, head_dim=mf.head_dim)
    assert mf.attention("softmax", SEQ) == 3 * fwd < fa2 / BATCH
    assert mf.document(SEQ) == 6 * mf.n * SEQ + 4 * 3 * fwd


def test_sparse_kinds_are_kernels_flops_counts(counted):
    """S2 / Lightning / MoH layers: kernels.flops (no recompute) with the model's layout, heads and
    routing; S2 equals its block mask's visible pairs; per document under document masking."""
    from seqpar.kernels import S2Layout
    from seqpar.megatron.config import KIND_OF_LETTER
    from seqpar.train.perf import ModelFlops

    for variant, kinds in {"s2": "SA", "lightning": "LLLA", "moh": "H"}.items():
        cfg = counted[variant][0]
        mf = ModelFlops(cfg, VOCAB)
        m = cfg.model
        layout = S2Layout(block_size=m.s2_block_size, local_blocks=m.s2_local_blocks, vert_stride=m.s2_vert_stride)
        kw = dict(batch=1, heads=mf.heads, head_dim=mf.head_dim, kv_heads=mf.kv_heads, layout=layout, backward=True,
                  recompute=False, active_fraction=(m.moh_num_shared_heads + m.moh_top_k) / mf.heads)
        for n in (SEQ, 40, 7):
            want = sum(attention_flops(KIND_OF_LETTER[c], seq_len=n, **kw)
                       for c in (kinds * 4)[:4])
            assert mf.document(n) == 6 * mf.n * n + want, (variant, n)
        assert mf.rows([40, 24, 64]) == mf.document(40) + mf.document(24) + mf.document(64)
    # S2: 2 (d + dv) per visible pair forward, 2x that backward; pairs from the block mask
    mf = ModelFlops(counted["s2"][0], VOCAB)
    nb = SEQ // 16
    blocks = mf.layout.block_mask(mf.heads, mf.kv_heads, nb, nb)
    pairs = sum(16 * 16 if i != j else 16 * 17 // 2 for h, i, j in blocks.nonzero().tolist())
    assert mf.attention("s2", SEQ) == 3 * 2 * (2 * mf.head_dim) * pairs
    assert mf.attention("moh", SEQ) == mf.attention("softmax", SEQ) / 2  # 1 shared + top-1 of 4 heads


def test_peak_table_and_recipe_field(monkeypatch):
    from seqpar.train import perf
    from seqpar.train.config import RecipeError, from_dict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # (bf16, fp32 with TF32 matmuls, plain fp32): the data sheets' dense numbers
    for name, peaks in (("NVIDIA H100 80GB HBM3", (989.4, 494.7, 66.9)), ("NVIDIA H100 PCIe", (756.0, 378.0, 51.2)),
                        ("NVIDIA H200", (989.4, 494.7, 66.9)), ("NVIDIA A100-SXM4-80GB", (312.0, 156.0, 19.5)),
                        ("NVIDIA L40S", (362.05, 183.0, 91.6)), ("NVIDIA A40", (149.7, 74.8, 37.4)),
                        ("NVIDIA GeForce RTX 4090", (165.2, 82.6, 82.6)), ("Tesla T4", (None, None, None))):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert perf.device_peak_tflops("cuda:0") == peaks[0], name
        assert perf.device_peak_tflops("cuda:0", "bf16") == peaks[0], name
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        assert perf.device_peak_tflops("cuda:0", "fp32") == peaks[1], name
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        assert perf.device_peak_tflops("cuda:0", "fp32") == peaks[2], name  # an fp32 model no longer reads 15x low
    assert perf.device_peak_tflops("cpu") is None and perf.device_peak_tflops("cpu", "fp32") is None
    for bad in (0, -1, 989e12, float("inf")):
        with pytest.raises(RecipeError, match="train.peak_tflops"):
            from_dict({"train": {"peak_tflops": bad}})
    assert from_dict({"train": {"peak_tflops": 312}}).train.peak_tflops == 312


def test_throughput_scalars_and_summary():
    """perf/* of a step: tokens and model FLOPs of the batch over dt, MFU against the recipe's peak;
    none without a peak on a CPU; the summary averages without the warm-up step."""
    from seqpar.data.batch import Batch
    from seqpar.train.perf import Throughput

    pos = torch.cat([torch.arange(40), torch.arange(24)]).expand(BATCH, SEQ)
    batch = Batch(torch.zeros(BATCH, SEQ, dtype=torch.long), torch.zeros(BATCH, SEQ, dtype=torch.long),
                  torch.ones(BATCH, SEQ), pos)
    t = Throughput(_recipe("tiny-hybrid", peak_tflops=1e-3), VOCAB, "cpu")
    fl = 2 * (t.flops.document(40) + t.flops.document(24))
    s = t.step(batch, 2.0)
    assert s["tokens_per_s_per_gpu"] == BATCH * SEQ / 2.0 and s["tflops_per_gpu"] == fl / 2.0 / 1e12
    assert s["mfu"] == pytest.approx(fl / 2.0 / 1e12 / 1e-3) and s["peak_memory_gib"] > 0
    t.step(batch, 0.5)
    assert t.summary().startswith(f"{BATCH * SEQ / 0.5:,.0f} tokens/s per GPU")
    none = Throughput(_recipe("tiny-hybrid"), VOCAB, "cpu")
    assert "mfu" not in none.step(batch, 1.0) and "MFU not reported" in none.summary()
