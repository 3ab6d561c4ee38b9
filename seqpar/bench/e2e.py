"""End-to-end suite: tokens/s of one training step per preset and attention kind, measured with the
trainer's own step (the recipe's engine from ``seqpar.train.engine.engine_class``, its ``build`` and
``train_step``, as the training loop calls them: megatron-core GPTModel in DDP, its optimizer and
schedule), MQAR batches, one rank, CP 1.

Every engine is built first, then the steps are timed interleaved (the harness's discipline), so
the kinds share the machine's state. Shapes: "cpu" tiny preset (hidden 64, 4 heads), seq 512, fp32;
"gpu" the 125m preset, seq 8192, bf16; "smoke" tiny at seq 64.
"""

from __future__ import annotations

import tempfile

import torch

from seqpar.bench.common import Context, Impl, SuiteResult, median_ms, plotter, time_group
from seqpar.bench.report import new_figure, save_figure

E2E_SHAPES = {  # size, variants, seq, global batch, dtype
    "smoke": ("tiny", ["dense", "lightning"], 64, 2, "fp32"),
    "cpu": ("tiny", ["dense", "s2", "lightning", "moh", "hybrid"], 512, 4, "fp32"),
    "gpu": ("125m", ["dense", "s2", "lightning", "moh", "hybrid"], 8192, 1, "bf16"),
}


def _recipe(preset: str, seq: int, batch: int, dtype: str, backend: str):
    from seqpar.train.config import from_dict

    return from_dict({
        "model": {"preset": preset, "dtype": dtype, "s2_block_size": 16 if seq <= 512 else 64,
                  "s2_local_blocks": 2, "s2_vert_stride": 4},
        "parallel": {"tensor_parallel": 1, "context_parallel": 1, "backend": backend},
        "data": {"dataset": "mqar", "seq_len": seq, "global_batch": batch, "vocab_size": 256},
        "train": {"steps": 1, "progress": False, "out_dir": tempfile.mkdtemp(prefix="seqpar_bench_e2e_")},
    })


def e2e_suite(ctx: Context) -> SuiteResult:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.models.presets import preset as preset_pattern
    from seqpar.train.engine import Batch, StepContext, engine_class
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.perf import ModelFlops, device_peak_tflops, math_mode
    from seqpar.train.runtime import param_device

    size, variants, seq, batch, dtype = E2E_SHAPES[ctx.size]
    res = SuiteResult(f"End to end: one training step (trainer's train_step, 1 rank), preset {size}, seq {seq}, "
                      f"global batch {batch}, {dtype}, MQAR batches")
    started = False
    if not dist.is_initialized():
        rdv = tempfile.mktemp(prefix="seqpar_bench_rdv_")
        init_parallel(1, 1, seed=1234, init_method=f"file://{rdv}", rank=0, world_size=1)
        started = True
    else:
        init_parallel(1, 1, seed=1234)
    impls = []
    try:
        for variant in variants:
            preset = f"{size}-{variant}"
            # explicit: under TRITON_INTERPRET=1 (make test) "auto" would pick the interpreter on CPU
            cfg = _recipe(preset, seq, batch, dtype, "triton" if ctx.cuda else "torch")
            data, vocab = build_data(cfg)
            engine = engine_class(cfg.train.engine).build(cfg, vocab)
            engine.train()
            device = param_device(engine.model)
            step_batch = Batch(*_batch(data, 0, cfg, device))
            n_params = sum(p.numel() for c in engine.model for p in c.parameters())
            # the trainer's model FLOPs of the step (perf/tflops_per_gpu): the row's tflops, and MFU
            impls.append(Impl(preset, lambda e=engine, b=step_batch: e.train_step(b, StepContext(0)),
                              flops=ModelFlops(cfg, vocab).batch(step_batch),
                              params={"pattern": preset_pattern(preset).pattern, "params_M": round(n_params / 1e6, 3)}))
        rows = time_group(ctx, f"train step seq {seq} x {batch}", "step", impls,
                          {"seq": seq, "global_batch": batch, "dtype": dtype})
        peak = device_peak_tflops(device, dtype)
        for r in rows:
            if median_ms(r):
                r["metrics"]["tokens_per_s"] = seq * batch / (median_ms(r) / 1e3)
                if peak and r["tflops"]:
                    r["metrics"]["mfu"] = r["tflops"] / peak
        res.results += rows
        res.notes.append("TFLOP/s: the trainer's model FLOPs (seqpar.train.perf: 6N + attention per kind, no "
                         "recompute, as perf/tflops_per_gpu); "
                         + (f"MFU against the device's {peak:g} TFLOP/s dense {math_mode(dtype)} peak" if peak
                            else "MFU not reported (no peak TFLOP/s known for this device)"))
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
        if not torch.cuda.is_available():
            from seqpar.megatron import disable_cpu_compat

            disable_cpu_compat()
    _plot(ctx, res)
    return res


@plotter
def _plot(ctx: Context, res: SuiteResult) -> None:
    ok = [r for r in res.results if r["status"] == "ok"]
    if not ok:
        return
    fig, axes = new_figure(res.notes, 1, "training step throughput (tokens/s, median)")
    if fig is None:
        return
    ax = axes[0]
    ax.bar([r["impl"] for r in ok], [r["metrics"]["tokens_per_s"] for r in ok], color="tab:blue")
    ax.set_ylabel("tokens / s")
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.grid(alpha=0.3, axis="y")
    path = ctx.out / "e2e.png"
    save_figure(fig, path, ctx.stamp_line)
    res.plots.append(path.name)

