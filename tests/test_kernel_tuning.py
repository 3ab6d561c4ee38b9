"""Launch-config selection (seqpar.kernels._tuning): deterministic default on CPU / with
SEQPAR_AUTOTUNE=0 / with debug counters, triton.autotune over the pruned space on CUDA.

The tables themselves are checked against sm_90 / sm_80 compile metadata in
test_kernel_resources.py; here the target selection (CUDA capability, harness compile target)
is checked, and every launcher's autotune key is checked against its kernel's argument names (a wrong name
would make Triton tune once and never again) by running each op with autotuning forced on.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import _tuning
from seqpar.kernels._tuning import ALL_CONFIGS, cfg, launch


class FakeKernel:
    """Records ``kernel[grid](*args, **kwargs)``."""

    arg_names = ("X", "N", "BLOCK")

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_default_on_cpu_and_when_disabled(monkeypatch):
    k = FakeKernel()
    space = (cfg(8, 2), cfg(4, 3))
    launch(k, (3,), (1, 2), {"BLOCK": 16}, default=cfg(8, 2), space=space, key=("BLOCK",), device=torch.device("cpu"))
    assert k.calls == [((3,), (1, 2), {"BLOCK": 16, "num_warps": 8, "num_stages": 2})]
    monkeypatch.setenv("SEQPAR_AUTOTUNE", "0")
    assert not _tuning.autotune_enabled(torch.device("cuda"))
    monkeypatch.setenv("SEQPAR_AUTOTUNE", "1")
    assert _tuning.autotune_enabled(torch.device("cuda")) and not _tuning.autotune_enabled(torch.device("cpu"))


def test_autotune_wraps_the_space_keyed_by_name(monkeypatch):
    built = []

    def fake_autotune(configs, key):
        def wrap(kernel):
            built.append(([(c.num_warps, c.num_stages) for c in configs], key))
            return kernel
        return wrap

    import triton

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setattr(_tuning, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(_tuning, "_TUNERS", {})
    k = FakeKernel()
    space = (cfg(8, 2), cfg(4, 3))
    launch(k, (1,), (0,), {"BLOCK": 16}, default=cfg(8, 2), space=space, key=("BLOCK",), device=torch.device("cpu"))
    assert built == [([(8, 2), (4, 3)], ["BLOCK"])]
    assert k.calls == [((1,), (0,), {"BLOCK": 16})]  # the autotuner picks warps / stages
    # debug counters (atomics) pin the default: re-running a config would count twice
    launch(k, (1,), (0,), {"BLOCK": 16}, default=cfg(8, 2), space=space, key=("BLOCK",), device="cpu",
           tunable=False)
    assert k.calls[-1][2] == {"BLOCK": 16, "num_warps": 8, "num_stages": 2}


def test_forced_config_only_where_in_space():
    k = FakeKernel()
    with _tuning.forced(cfg(4, 3)):
        launch(k, (1,), (), {}, default=cfg(8, 2), space=(cfg(8, 2), cfg(4, 3)), key=(), device="cpu")
        launch(k, (1,), (), {}, default=cfg(8, 2), space=(cfg(8, 2),), key=(), device="cpu")
    assert [c[2] for c in k.calls] == [{"num_warps": 4, "num_stages": 3}]
    assert set(ALL_CONFIGS) >= {cfg(8, 2), cfg(4, 3)}


def test_target_from_cuda_capability_or_compile_target(monkeypatch):
    """The table follows torch.cuda.get_device_capability on CUDA; the harness's compile_target
    selects the same entry for CPU tensors; CPU alone (interpreter) uses the sm_90 table."""
    bf16 = torch.bfloat16
    assert _tuning.target_capability("cpu") is None and _tuning.target_arch("cpu") == 90
    for cap, arch in ((75, 80), (80, 80), (86, 86), (87, 86), (89, 86), (90, 90), (100, 90)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: divmod(c, 10))
        assert _tuning.target_arch(torch.device("cuda")) == arch
        with _tuning.compile_target(cap):
            assert _tuning.target_capability("cpu") == cap and _tuning.target_arch("cpu") == arch
            for kind in ("fwd", "dq", "dkdv"):
                for op in ("s2", "moh"):
                    assert (_tuning.attention_tuning(kind, 64, 128, bf16, "cpu", op=op)
                            == _tuning.attention_tuning(kind, 64, 128, bf16, torch.device("cuda"), op=op))
    assert _tuning.target_capability("cpu") is None  # the context is left
    with _tuning.compile_target(80):
        a100 = _tuning.attention_tuning("dkdv", 64, 128, bf16, "cpu")
        moh = _tuning.attention_tuning("dkdv", 64, 128, bf16, "cpu", op="moh")
        light = _tuning.lightning_tuning("chunk", "cpu")
    h100 = _tuning.attention_tuning("dkdv", 64, 128, bf16, "cpu")
    assert a100.default == cfg(8, 1) and h100.default == cfg(8, 2)  # differ where the metadata says so
    assert moh.block_m == 32 and h100.block_m is None
    from seqpar.kernels.moh.triton_bwd import dkdv_row_tile

    assert dkdv_row_tile(moh, 64) == 32 and dkdv_row_tile(moh, 32) == 32 and dkdv_row_tile(h100, 64) == 64
    # sm_86 / sm_89 (99 KB of shared memory per CTA) have their own entries where sm_80's spill or
    # leave one CTA of 4 warps per SM there (tests/test_kernel_resources.py measures them)
    with _tuning.compile_target(86):
        ada_dkdv = _tuning.attention_tuning("dkdv", 64, 64, bf16, "cpu")
        ada_dq = _tuning.attention_tuning("dq", 64, 128, bf16, "cpu")
    with _tuning.compile_target(80):
        a100_dkdv = _tuning.attention_tuning("dkdv", 64, 64, bf16, "cpu")
        a100_dq = _tuning.attention_tuning("dq", 64, 128, bf16, "cpu")
    assert ada_dkdv.default == cfg(8, 1) and a100_dkdv.default == cfg(8, 2)
    assert ada_dq.default == cfg(8, 2) and a100_dq.default == cfg(4, 2)
    assert light.default == cfg(4, 2) and _tuning.lightning_tuning("chunk", "cpu").default == cfg(8, 3)


def test_window_tuning_falls_back_to_causal():
    """flash_attention(window=) compiles its own specialisation and tunes it as op "window": its own
    entry where a causal config spills under the window (measured in test_kernel_resources.py),
    the causal entry everywhere else (sm_86 has no window entry at all)."""
    from seqpar.kernels.s2.plan import build_plan
    from seqpar.kernels.s2.triton_fwd import plan_tuning

    q128 = torch.empty(1, 64, 1, 128, dtype=torch.bfloat16)
    q64 = torch.empty(1, 64, 1, 64, dtype=torch.float16)
    causal, window = (build_plan(None, True, 1, 64, 64, 0, 0, None, 64, window=w) for w in (0, 16))
    with _tuning.compile_target(90):
        assert plan_tuning("dkdv", window, q128).space == (cfg(8, 3), cfg(8, 1))
        assert plan_tuning("dkdv", causal, q128).default == cfg(8, 2)  # spills 4 B under the window
        assert plan_tuning("fwd", window, q128) == plan_tuning("fwd", causal, q128)
    with _tuning.compile_target(80):
        assert plan_tuning("dq", window, q64).default == cfg(8, 3)
        assert plan_tuning("dq", causal, q64).default == cfg(4, 3)  # spills 8 B under the window
        assert cfg(4, 1) in plan_tuning("dkdv", causal, q64).space
        assert cfg(4, 1) not in plan_tuning("dkdv", window, q64).space
    with _tuning.compile_target(86):
        for kind in ("fwd", "dq", "dkdv"):
            for q in (q64, q128):
                assert plan_tuning(kind, window, q) == plan_tuning(kind, causal, q)


def test_tables_are_consistent():
    """Every table entry's default heads its space, and every config is one the harness can force."""
    for t in (*_tuning._ATTENTION.values(), *_tuning._LIGHTNING.values()):
        assert t.space[0] == t.default and len(set(t.space)) == len(t.space)
        assert set(t.space) <= set(ALL_CONFIGS)
    # every (target, tile class) has an S2 entry for each kernel (MoH falls back to it)
    for arch in (80, 90):
        for tc in ("s", "m", "l"):
            for kind in ("fwd", "dq", "dkdv"):
                assert (arch, tc, "s2", kind) in _tuning._ATTENTION


def test_every_launcher_key_names_kernel_arguments(monkeypatch):
    """Run S2, flash, MoH and Lightning (fwd + bwd) with autotuning 'on': each launch hands
    its kernel, space and key to the tuner; the key must name arguments of that kernel and the
    default must be in the space. The launch itself runs the default (interpreter)."""
    seen = {}

    def recorder(kernel, space, key):
        names = set(kernel.arg_names)
        assert set(key) <= names, (kernel, key)
        seen[getattr(kernel, "__name__", None) or kernel.fn.__name__] = key
        cfg0 = space[0]

        class Run:
            def __getitem__(self, grid):
                return lambda *a, **kw: kernel[grid](*a, **kw, **cfg0.kwargs())
        return Run()

    monkeypatch.setattr(_tuning, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(_tuning, "_tuner", recorder)
    from seqpar.kernels import S2Layout, flash_attention, lightning_attention, moh_attention, s2_attention

    q = torch.randn(1, 40, 2, 16, requires_grad=True)
    k = torch.randn(1, 40, 1, 16, requires_grad=True)
    v = torch.randn(1, 40, 1, 16, requires_grad=True)
    s2_attention(q, k, v, S2Layout(block_size=16, local_blocks=1, vert_stride=2), backend="triton").sum().backward()
    flash_attention(q, k, v, causal=False, backend="triton").sum().backward()
    gates = (torch.rand(1, 40, 2) > 0.5).float()
    moh_attention(q, k, v, gates, backend="triton").sum().backward()
    o, _ = lightning_attention(q, k, v, torch.tensor([0.1, 0.2]), backend="triton")
    o.sum().backward()
    assert {n.strip("_") for n in seen} >= {
        "s2_fwd_kernel", "s2_bwd_dq_kernel", "s2_bwd_dkdv_kernel", "moh_fwd_kernel", "moh_bwd_dq_kernel",
        "moh_bwd_dkdv_kernel", "chunk_state_kernel", "output_kernel", "dv_kernel", "dqk_kernel"}


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
