"""Kernel suites: S2 vs SDPA vs ``flex_attention`` (same BlockMask) vs seqpar's dense flash;
Lightning vs SDPA vs flash-linear-attention's ``chunk_simple_gla`` (same decay); MoH at 25 / 50 /
75 / 100 % active (token, head) pairs vs masked dense SDPA. Forward and forward + backward, time,
TFLOP/s of the FLOPs the mask needs (:mod:`seqpar.kernels.flops`) and peak memory.

Shapes (``ctx.size``): "gpu" follows the papers (S2: 32 heads MHA, d 128, bf16, block 64, local 16
blocks, vert_stride 8 / 16 as DKernel / phi-3-small; Lightning-2: b 4, h 32, d 128, bf16; MoH:
b 2, 32 heads / 8 kv heads, d 128, bf16); "cpu" is small (fp32, torch paths, a few minutes);
"smoke" is the minimum that exercises every code path (tests).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from seqpar.bench.common import (Context, Impl, SuiteResult, fwd_call, grad_call, median_ms, plotter,
                                 time_group)
from seqpar.bench.report import new_figure, save_figure
from seqpar.kernels import S2Layout, flash_attention, lightning_attention, lightning_slopes, moh_attention, s2_attention
from seqpar.kernels.flops import attention_flops

MODES = ("fwd", "fwd+bwd")


def _backend(ctx: Context) -> str:
    # explicit: the Triton interpreter (TRITON_INTERPRET=1) is a test tool, not a CPU path
    return "triton" if ctx.cuda else "torch"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sdpa(q, k, v):
    """torch SDPA, causal, GQA without expanding k/v; ``[b, s, h, d]`` in and out."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _call(mode: str, fn: Callable, inputs, grad_out=None) -> Callable[[], Any]:
    """One forward (on detached inputs, no graph) or forward + backward call of ``fn(*inputs)``."""
    if mode == "fwd":
        return fwd_call(fn, [t.detach() for t in inputs])
    return grad_call(fn, inputs, grad_out)


def _max_diff(a: Callable, b: Callable, inputs) -> float | str:
    """max |a - b| of two implementations' forward outputs on the same inputs (the same-math check
    of a baseline), or the error that prevented it."""
    try:
        with torch.no_grad():
            xs = [t.detach() for t in inputs]
            return float((a(*xs).float() - b(*xs).float()).abs().max())
    except Exception as e:  # noqa: BLE001 - the timings still stand; the check says why it is missing
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


# --------------------------------------------------------------------------------------------- S2

S2_SHAPES = {  # b, h, hkv, d, dtype, block, local, seqs, strides
    "smoke": (1, 2, 1, 16, torch.float32, 16, 1, [128], [2]),
    "cpu": (1, 4, 2, 64, torch.float32, 64, 2, [1024, 2048], [4, 8]),
    "gpu": (1, 32, 32, 128, torch.bfloat16, 64, 16, [8192, 16384, 32768, 65536], [8, 16]),
}


def _flex_block_mask(layout: S2Layout, h: int, hkv: int, seq: int, device):
    """flex_attention's BlockMask with exactly S2's blocks: off-diagonal listed blocks are full,
    the diagonal blocks partial (token-level causal via ``mask_mod``). Built from the layout's block
    table directly (``create_block_mask`` would evaluate a mask over all ``seq^2`` pairs)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = layout.block_size
    nb = -(-seq // bs)
    m = layout.with_heads(h).block_mask(h, hkv, nb, nb)  # [h, nb, nb]
    eye = torch.eye(nb, dtype=torch.bool)

    def lists(sel: torch.Tensor):
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # listed blocks first, ascending
        return sel.sum(-1).to(torch.int32)[None].to(device), order.to(torch.int32)[None].to(device)

    num, idx = lists(m & eye)
    full_num, full_idx = lists(m & ~eye)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=_causal_mod,
                                    seq_lengths=(seq, seq))


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=None)
def _flex(compiled: bool):
    """flex_attention, compiled (the fused kernel a user runs) or eager (the backward probe)."""
    from torch.nn.attention.flex_attention import flex_attention

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    warnings.filterwarnings("ignore", message=".*_safe_softmax")
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@functools.lru_cache(maxsize=None)
def _flex_backward_on(device_type: str) -> Optional[str]:
    """None when flex_attention has a backward on this device type, else torch's reason."""
    if device_type == "cuda":
        return None
    from torch.nn.attention import flex_attention as fa

    q = torch.zeros(1, 1, 16, 16, requires_grad=True)
    try:  # torch's own device check when it has one (a call of eager flex traces for ~30 s on CPU)
        check = getattr(fa, "_validate_device", None)
        check(q, q, q) if check is not None else _flex(False)(q, q, q).sum().backward()
    except Exception as e:  # noqa: BLE001 - the reason is the report
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def s2_suite(ctx: Context) -> SuiteResult:
    b, h, hkv, d, dtype, bs, local, seqs, strides = S2_SHAPES[ctx.size]
    seqs = ctx.seqs or seqs
    backend = _backend(ctx)
    res = SuiteResult(f"S2 vs dense attention: b {b}, h {h}, kv heads {hkv}, d {d}, {_dtype_name(dtype)}, "
                      f"block {bs}, local {local} blocks, vert_stride {strides}; backend {backend}")
    flex_ok, no_flex_bwd = False, None
    if ctx.size == "smoke":  # even eager flex_attention traces with dynamo first (~30 s): not for tests
        res.miss("flex_attention", "skipped at smoke size (its first call traces with torch.compile's dynamo, "
                                   "~30 s on CPU); the cpu and gpu sizes time it")
    else:
        try:
            _flex(True)
            flex_ok = True
        except Exception as e:  # noqa: BLE001
            res.miss("flex_attention", f"not available in torch {torch.__version__}: {e}")
    if flex_ok:
        no_flex_bwd = _flex_backward_on(ctx.device.type)
        if no_flex_bwd:
            res.miss("flex_attention fwd+bwd", f"torch {torch.__version__} on {ctx.device.type}: {no_flex_bwd}")
        res.notes.append("flex_attention is compiled (torch.compile; inductor's C++ backend on CPU): its "
                         "first_call_s is the compile time per shape" + ("" if ctx.cuda else "; no peak memory on "
                         "CPU (compiled code cannot run under the dispatch mode that counts tensor bytes)"))
    for seq in seqs:
        gen = torch.Generator(device="cpu").manual_seed(seq)
        q, k, v = (torch.randn(b, seq, hh, d, generator=gen).to(ctx.device, dtype).requires_grad_()
                   for hh in (h, hkv, hkv))
        do = torch.randn(q.shape, generator=gen).to(ctx.device, dtype)
        layouts = {vs: S2Layout(block_size=bs, local_blocks=local, vert_stride=vs) for vs in strides}
        masks = {}
        if flex_ok:
            for vs, lay in layouts.items():
                masks[vs] = _flex_block_mask(lay, h, hkv, seq, ctx.device)
        for mode in MODES:
            if res.over_budget(ctx, f"S2 seq {seq} {mode}"):
                return _finish_s2(ctx, res)
            bwd = mode == "fwd+bwd"
            dense = attention_flops("softmax", batch=b, seq_len=seq, heads=h, head_dim=d, backward=bwd)
            impls = [Impl("sdpa", _call(mode, _sdpa, (q, k, v), do), dense, {"density": 1.0}),
                     Impl("seqpar flash", _call(mode, functools.partial(flash_attention, backend=backend),
                                                (q, k, v), do), dense, {"density": 1.0})]
            for vs, lay in layouts.items():
                fl = attention_flops("s2", batch=b, seq_len=seq, heads=h, kv_heads=hkv, head_dim=d, layout=lay,
                                     backward=bwd)
                p = {"vert_stride": vs, "density": round(fl / dense, 4)}
                s2 = functools.partial(s2_attention, layout=lay, backend=backend)
                impls.append(Impl(f"seqpar s2 vs{vs}", _call(mode, s2, (q, k, v), do), fl, p))
                if vs in masks and not (bwd and no_flex_bwd):
                    flex = functools.partial(_run_flex, block_mask=masks[vs])
                    # CPU: compiled code cannot run under the dispatch mode that counts tensor bytes
                    impls.append(Impl(f"flex vs{vs}", _call(mode, flex, (q, k, v), do), fl, p, memory=ctx.cuda))
            rows = time_group(ctx, f"seq {seq} {mode}", mode, impls, {"seq": seq})
            _speedups(rows, "sdpa")
            _speedups(rows, "seqpar flash", "flash")  # the S2 paper's target: >= 0.7 / density
            if mode == "fwd":
                for vs, lay in layouts.items():
                    if vs in masks:
                        diff = _max_diff(functools.partial(_run_flex, block_mask=masks[vs]),
                                         functools.partial(s2_attention, layout=lay, backend=backend), (q, k, v))
                        _record_diff(res, rows, f"flex vs{vs}", "max_abs_diff_vs_s2", diff)
            res.results += rows
    return _finish_s2(ctx, res)


def _run_flex(q, k, v, *, block_mask):
    o = _flex(True)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                    enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _record_diff(res: SuiteResult, rows: list[dict], impl: str, metric: str, diff: float | str) -> None:
    for r in rows:
        if r["impl"] == impl:
            if isinstance(diff, str):
                res.notes.append(f"{impl} ({r['group']}): output check failed: {diff}")
            else:
                r["metrics"][metric] = diff


def _speedups(rows: list[dict], base: str, key: Optional[str] = None) -> None:
    """metric ``x_vs_<key or base>``: the base implementation's median over this one's (> 1: faster)."""
    ref = next((median_ms(r) for r in rows if r["impl"] == base), None)
    for r in rows:
        if ref and median_ms(r):
            r["metrics"][f"x_vs_{key or base}"] = ref / median_ms(r)


def replot_s2(ctx: Context, res: SuiteResult) -> None:
    _finish_s2(ctx, res)


def replot_lightning(ctx: Context, res: SuiteResult) -> None:
    _finish_lightning(ctx, res)


def _finish_s2(ctx: Context, res: SuiteResult) -> SuiteResult:
    _plot_lines(ctx, res, "s2", key="seq", xlabel="tokens", title="S2 vs dense (ms per call, log-log)")
    return res


@plotter
def _plot_lines(ctx: Context, res: SuiteResult, name: str, *, key: str, xlabel: str, title: str,
                logx: bool = True) -> None:
    """One panel per mode: median ms of each implementation over ``params[key]``."""
    ok = [r for r in res.results if r["status"] == "ok"]
    if not ok:
        return
    fig, axes = new_figure(res.notes, len(MODES), title)
    if fig is None:
        return
    impls = sorted({r["impl"] for r in ok})  # one color per implementation in every panel
    for ax, mode in zip(axes, MODES):
        for i, impl in enumerate(impls):
            pts = sorted((r["params"][key], r["ms"]["median"]) for r in ok if r["mode"] == mode and r["impl"] == impl)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i % 10}", label=impl)
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms (median)")
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = ctx.out / f"{name}.png"
    save_figure(fig, path, ctx.stamp_line)
    res.plots.append(path.name)


# --------------------------------------------------------------------------------------- Lightning

LIGHTNING_SHAPES = {  # b, h, d, dtype, seqs
    "smoke": (1, 2, 16, torch.float32, [128, 256]),
    "cpu": (1, 2, 32, torch.float32, [1024, 2048, 4096, 8192]),
    "gpu": (4, 32, 128, torch.bfloat16, [2048, 4096, 8192, 16384, 32768]),
}


def _fla(device: torch.device) -> tuple[Optional[Callable], str]:
    """FLA's ``chunk_simple_gla`` with Lightning's decay (constant per-head log decay ``-slope``),
    or (None, why not)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        return None, (f"flash-linear-attention (fla-core) is not installed ({type(e).__name__}); "
                      "pip install 'seqpar[bench]' on a GPU host")
    if device.type != "cuda":
        return None, "fla's chunk_simple_gla is Triton-only (needs CUDA)"

    def run(q, k, v, slope):
        try:  # a constant per-head log decay (fla >= 0.2)
            return chunk_simple_gla(q, k, v, g_gamma=-slope, scale=1.0)[0]
        except TypeError:  # older fla: per-token log decay [B, T, H]
            g = (-slope).expand(q.shape[0], q.shape[1], -1).contiguous()
            return chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]

    return run, ""


def lightning_suite(ctx: Context) -> SuiteResult:
    b, h, d, dtype, seqs = LIGHTNING_SHAPES[ctx.size]
    seqs = ctx.seqs or seqs
    backend = _backend(ctx)
    res = SuiteResult(f"Lightning vs softmax attention: b {b}, h {h}, d {d}, {_dtype_name(dtype)}; backend {backend} "
                      "(x_vs_half = t(N) / t(N/2): linear 2, quadratic 4)")
    slope = lightning_slopes(h).to(ctx.device)
    fla, why = _fla(ctx.device)
    if fla is None:
        res.miss("fla chunk_simple_gla", why)
    if not ctx.cuda:
        res.notes.append("seqpar flash is timed here on CUDA only (its CPU path, a tile loop, is in the s2 suite)")
    light = lambda q, k, v: lightning_attention(q, k, v, slope, backend=backend)[0]  # noqa: E731
    for seq in seqs:
        gen = torch.Generator(device="cpu").manual_seed(seq)
        q, k, v = ((torch.randn(b, seq, h, d, generator=gen) * 0.1).to(ctx.device, dtype).requires_grad_()
                   for _ in range(3))
        do = torch.randn(q.shape, generator=gen).to(ctx.device, dtype)
        for mode in MODES:
            if res.over_budget(ctx, f"Lightning seq {seq} {mode}"):
                return _finish_lightning(ctx, res)
            bwd = mode == "fwd+bwd"
            soft = attention_flops("softmax", batch=b, seq_len=seq, heads=h, head_dim=d, backward=bwd)
            lin = attention_flops("lightning", batch=b, seq_len=seq, heads=h, head_dim=d, backward=bwd)
            impls = [Impl("seqpar lightning", _call(mode, light, (q, k, v), do), lin),
                     Impl("sdpa", _call(mode, _sdpa, (q, k, v), do), soft)]
            if ctx.cuda:  # on CPU its tile-loop torch path takes minutes at 8K: the s2 suite times it
                impls.append(Impl("seqpar flash", _call(mode, functools.partial(flash_attention, backend=backend),
                                                        (q, k, v), do), soft))
            if fla is not None:
                fla_run = functools.partial(fla, slope=slope)
                impls.append(Impl("fla chunk_simple_gla", _call(mode, fla_run, (q, k, v), do), lin))
            rows = time_group(ctx, f"seq {seq} {mode}", mode, impls, {"seq": seq})
            if fla is not None and mode == "fwd":
                diff = _max_diff(functools.partial(fla, slope=slope), light, (q, k, v))
                _record_diff(res, rows, "fla chunk_simple_gla", "max_abs_diff_vs_lightning", diff)
            _speedups(rows, "sdpa")
            for r in rows:
                if median_ms(r):
                    r["metrics"]["tokens_per_s"] = b * seq / (median_ms(r) / 1e3)
            res.results += rows
    return _finish_lightning(ctx, res)


def _finish_lightning(ctx: Context, res: SuiteResult) -> SuiteResult:
    by = {}
    for r in res.results:  # t(N) / t(N/2) per implementation and mode
        if median_ms(r):
            prev = by.get((r["impl"], r["mode"]))
            if prev and prev[0] * 2 == r["params"]["seq"]:
                r["metrics"]["x_vs_half"] = median_ms(r) / prev[1]
            by[(r["impl"], r["mode"])] = (r["params"]["seq"], median_ms(r))
    _plot_lines(ctx, res, "lightning", key="seq", xlabel="tokens",
                title="Lightning vs softmax (ms per call, log-log: slope 1 linear, 2 quadratic)")
    return res


# --------------------------------------------------------------------------------------------- MoH

MOH_SHAPES = {  # b, s, h, hkv, d, dtype
    "smoke": (1, 128, 4, 2, 16, torch.float32),
    "cpu": (1, 1024, 4, 2, 64, torch.float32),
    "gpu": (2, 8192, 32, 8, 128, torch.bfloat16),
}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def random_gates(b: int, s: int, h: int, frac: float, generator: torch.Generator) -> torch.Tensor:
    """Every token keeps ``round(frac * h)`` heads chosen at random, with positive weights (fp32, CPU)."""
    keep = round(frac * h)
    rank = torch.rand(b, s, h, generator=generator).argsort(dim=-1).argsort(dim=-1)
    return (torch.rand(b, s, h, generator=generator) + 0.5) * (rank < keep)


def dense_masked(q, k, v, gates):
    """What the MoH release does: every head with SDPA, then multiplied by its (zero) gate."""
    return _sdpa(q, k, v) * gates.unsqueeze(-1)


def moh_suite(ctx: Context) -> SuiteResult:
    b, s, h, hkv, d, dtype = MOH_SHAPES[ctx.size]
    if ctx.seqs:
        s = ctx.seqs[0]
    backend = _backend(ctx)
    res = SuiteResult(f"MoH vs active fraction: b {b}, s {s}, h {h}, kv heads {hkv}, d {d}, {_dtype_name(dtype)}; "
                      f"backend {backend} (x_vs_100 = t / t(100 %) of the same implementation)")
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, s, hh, d, generator=gen).to(ctx.device, dtype).requires_grad_() for hh in (h, hkv, hkv))
    do = torch.randn(q.shape, generator=gen).to(ctx.device, dtype)
    moh = functools.partial(moh_attention, backend=backend)
    for mode in MODES:
        if res.over_budget(ctx, f"MoH {mode}"):
            break
        impls = []
        for frac in FRACTIONS:
            g = random_gates(b, s, h, frac, gen).to(ctx.device, dtype).requires_grad_()
            fl = attention_flops("moh", batch=b, seq_len=s, heads=h, head_dim=d, active_fraction=frac,
                                 backward=mode == "fwd+bwd")
            p = {"active": frac, "seq": s}
            impls.append(Impl(f"seqpar moh {int(frac * 100)}%", _call(mode, moh, (q, k, v, g), do), fl, p))
            impls.append(Impl(f"sdpa+mask {int(frac * 100)}%", _call(mode, dense_masked, (q, k, v, g), do), fl, p))
        rows = time_group(ctx, f"s {s} {mode}", mode, impls, {})
        for family in ("seqpar moh", "sdpa+mask"):
            full = next((median_ms(r) for r in rows if r["impl"] == f"{family} 100%"), None)
            for r in rows:
                if r["impl"].startswith(family) and full and median_ms(r):
                    r["metrics"]["x_vs_100"] = median_ms(r) / full
        res.results += rows
    _plot_moh(ctx, res)
    return res


@plotter
def _plot_moh(ctx: Context, res: SuiteResult) -> None:
    ok = [r for r in res.results if r["status"] == "ok"]
    if not ok:
        return
    fig, axes = new_figure(res.notes, len(MODES), "MoH: time vs active (token, head) pairs")
    if fig is None:
        return
    for ax, mode in zip(axes, MODES):
        for family in ("seqpar moh", "sdpa+mask"):
            pts = sorted((r["params"]["active"] * 100, r["ms"]["median"]) for r in ok
                         if r["mode"] == mode and r["impl"].startswith(family))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=family)
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel("active pairs (%)")
        ax.set_ylabel("ms (median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = ctx.out / "moh.png"
    save_figure(fig, path, ctx.stamp_line)
    res.plots.append(path.name)
