"""Regression tests of the engine for NCCL-only failures and numerics (issue #10 items 1, 2, 8, 10):

- every tensor that reaches a collective lives on the parameters' device: during DP=2 and CP=2
  training steps, (a) no tensor factory (``torch.zeros`` / ``tensor`` / ``ones`` / ``empty`` / ``full`` /
  ``arange``) is called without ``device=`` from seqpar.train or seqpar.megatron — on
  CPU that default device happens to be right, on GPU it is the host and NCCL rejects it (the
  pre-engine ``torch.zeros(())`` aux loss and the CPU fp64 grad norm were such calls) — and (b) every
  tensor passed to a torch.distributed collective is on the parameters' device;
- gradients are reduced in fp32 for a bf16 model (DDP's grad buffers and ``main_grad`` are fp32);
- norms, biases and other 1-D parameters get no weight decay (megatron's parameter groups), matrices
  get optim.weight_decay.
"""

from __future__ import annotations

import pathlib
import sys

import torch
from torch.overrides import TorchFunctionMode

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["data.dataset=mqar", "data.seq_len=64", "data.global_batch=4", "data.vocab_size=64", "data.mqar_pairs=4",
        "data.mqar_queries=4", "optim.warmup_steps=1", "train.progress=false", "parallel.backend=torch",
        "model.preset=tiny", "model.s2_block_size=16", "model.s2_local_blocks=1", "model.s2_vert_stride=2"]
CHECKED = ("seqpar.train", "seqpar.megatron")
# seqpar.cp builds a few index tensors on the host and moves them (issue #10 item 5, host syncs, not
# collective inputs): lasp2 chunk order, merge decay distances, partition positions
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "batch_isend_irecv")
# (isend / irecv themselves stay unwrapped: P2POp checks their identity; batch_isend_irecv's ops are checked)


class _DefaultDeviceFactories(TorchFunctionMode):
    """Records ``module:line`` of every factory call without ``device=`` made from CHECKED modules."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            # skip torch itself and the CPU shim's factory proxy (it forwards megatron-core's own calls)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                    ("torch", "seqpar.megatron.cpu_compat")):
                frame = frame.f_back
            name = frame.f_globals.get("__name__", "") if frame is not None else ""
            if name.startswith(CHECKED):
                self.calls.add(f"{name}:{frame.f_lineno}")
        return func(*args, **kwargs)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


def _step_checked(rank: int, world: int, overrides: list[str]):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.megatron_engine import build_engine, train_step
    from seqpar.train.step import param_device

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + overrides)
    par = cfg.parallel
    init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed)
    wrong: list[str] = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    try:
        data, vocab = build_data(cfg)
        engine = build_engine(cfg, vocab)
        device = param_device(engine.model)

        def checked(name, fn):
            def call(*args, **kwargs):
                items = list(args) + list(kwargs.values())
                if name == "batch_isend_irecv":
                    items = [op.tensor for op in args[0]]
                for t in _tensors(items):
                    if t.device != device:
                        wrong.append(f"{name}: {t.device} != {device}")
                return fn(*args, **kwargs)
            return call

        for name, fn in saved.items():
            setattr(dist, name, checked(name, fn))
        mode = _DefaultDeviceFactories()
        with mode:
            for step in range(2):
                res = train_step(engine, *_batch(data, step, cfg, device))
        return sorted(mode.calls), wrong, res.grad_norm
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        parallel_state.destroy_model_parallel()
        disable_cpu_compat()


def test_collective_tensors_live_on_the_parameters_device():
    # DP=2 without MoH layers (the aux-loss placeholder case) and CP=2 with them
    for overrides in (["model.pattern=ASL", "parallel.context_parallel=1"],
                      ["model.pattern=ASLH", "parallel.context_parallel=2"]):
        for calls, wrong, gnorm in run_ranks(_step_checked, 2, overrides, timeout=300):
            assert calls == [], f"{overrides}: tensor factories without device= at {calls}"
            assert wrong == [], overrides
            assert gnorm > 0


def _engine_facts(rank: int, world: int, overrides: list[str]):
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.megatron_engine import build_engine, train_step
    from seqpar.train.step import param_device

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + overrides + ["parallel.context_parallel=1"])
    init_parallel(1, 1, seed=cfg.train.seed)
    try:
        data, vocab = build_data(cfg)
        engine = build_engine(cfg, vocab)
        train_step(engine, *_batch(data, 0, cfg, param_device(engine.model)))
        ddp = engine.model[0]
        names = {id(p): n for n, p in ddp.module.named_parameters()}
        decay = {}
        for group in engine.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in names:  # fp32 model: the optimizer steps the model's own parameters
                    decay[names[id(p)]] = (group["weight_decay"], p.dim())
        grad_dtypes = sorted({str(b.grad_dtype) for b in ddp.buffers})
        main_grads = sorted({str(p.main_grad.dtype) for p in ddp.module.parameters()})
        params = sorted({str(p.dtype) for p in ddp.module.parameters()})
        return decay, grad_dtypes, main_grads, params
    finally:
        parallel_state.destroy_model_parallel()
        disable_cpu_compat()


def test_weight_decay_groups_and_fp32_grad_reduction():
    decay, grad_dtypes, main_grads, params = run_ranks(_engine_facts, 1, ["model.pattern=ASLH"], timeout=300)[0]
    assert "decoder.final_layernorm.weight" in decay and "embedding.word_embeddings.weight" in decay
    for name, (wd, dim) in decay.items():
        no_decay = dim == 1 or name.endswith(".bias")
        assert wd == (0.0 if no_decay else 0.1), (name, wd, dim)
    assert any(wd == 0.0 for wd, _ in decay.values()) and any(wd > 0 for wd, _ in decay.values())
    fp32 = run_ranks(_engine_facts, 1, ["model.pattern=ASL", "model.dtype=bf16"], timeout=300)[0]
    _, grad_dtypes, main_grads, params = fp32
    assert params == ["torch.bfloat16"]
    assert grad_dtypes == ["torch.float32"] and main_grads == ["torch.float32"]
