"""Regression tests of the engines for GPU-only failures and numerics (issue #10 items 1, 2, 8, 10;
issue #20 items 1, 2, 4, 6):

- every parameter, buffer and tensor attribute of every model chunk is on the device the engine
  builds for: built (and initialised) for the ``meta`` device, as a GPU run builds for its GPU,
  for every layer kind (ASLH), every (pipeline stage, TP rank) shard of TP=2 x PP=2 and both engines'
  layouts — on CPU the host is the default device, so nothing else would show a module left behind
  there (RMSNorm weights, Lightning's norm_weight, the MoH router, RoPE's inv_freq); after ZeRO-3's
  ``zero.Init`` every partition and buffer is on DeepSpeed's device;
- initialisation happens on the CPU whatever the device (``use_cpu_initialization`` also with CUDA), so
  the CPU parity tests (TP=1 vs TP=2, PP layouts) run the code a GPU run takes;
- every tensor that reaches a collective lives on the parameters' device: during DP=2 and CP=2
  training steps of the Megatron engine and CP=2 steps of the DeepSpeed engine (ZeRO-3), (a) no tensor
  factory (``torch.zeros`` / ``tensor`` / ``ones`` / ``empty`` / ``full`` / ``arange``) is called without
  ``device=`` from seqpar.train, seqpar.megatron or seqpar.deepspeed — on CPU that default device
  happens to be right, on GPU it is the host and NCCL rejects it (the pre-engine ``torch.zeros(())``
  aux loss, the CPU fp64 grad norm and the DeepSpeed step's token count were such calls) — and (b)
  every tensor passed to a torch.distributed collective is on the parameters' device;
- torch AdamW's ``step`` survives loading a distributed-optimizer checkpoint without the CPU shim (the
  GPU path of megatron's fully_reshardable loader);
- gradients are reduced in fp32 for a bf16 model (DDP's grad buffers and ``main_grad`` are fp32);
- norms, biases and other 1-D parameters get no weight decay (megatron's parameter groups), matrices
  get optim.weight_decay.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cp_harness import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["data.dataset=mqar", "data.seq_len=64", "data.global_batch=4", "data.vocab_size=64", "data.mqar_pairs=4",
        "data.mqar_queries=4", "optim.warmup_steps=1", "train.progress=false", "parallel.backend=torch",
        "model.preset=tiny", "model.s2_block_size=16", "model.s2_local_blocks=1", "model.s2_vert_stride=2"]
CHECKED = ("seqpar.train", "seqpar.megatron", "seqpar.deepspeed")
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


def _misplaced(chunks, device: torch.device) -> list[str]:
    """Every parameter, buffer and plain tensor attribute of ``chunks`` not on ``device`` (a ZeRO-3
    parameter is checked by its partition, ``ds_tensor``)."""
    bad = []
    for i, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            for what, t in (("parameter", p), ("ZeRO-3 partition", getattr(p, "ds_tensor", None))):
                if t is not None and t.device != device:
                    bad.append(f"chunk {i} {what} {name}: {t.device}")
        bad += [f"chunk {i} buffer {n}: {b.device}" for n, b in chunk.named_buffers() if b.device != device]
        for mname, mod in chunk.named_modules():
            bad += [f"chunk {i} tensor attribute {mname}.{k}: {v.device}" for k, v in vars(mod).items()
                    if isinstance(v, torch.Tensor) and v.device != device]
    return bad


def _engine_steps(cfg, steps: int, run):
    """Build ``cfg``'s engine through the engine interface, check its placement, run ``steps`` steps
    with ``run``; returns (grad norm of the last step, misplaced tensors after the build)."""
    from seqpar.train.engine import StepContext, engine_class
    from seqpar.train.loop import _batch, build_data

    data, vocab = build_data(cfg)
    engine = engine_class(cfg.train.engine).build(cfg, vocab)
    try:
        # every parameter (ZeRO-3: every partition; zero.Init leaves the buffers where build_model put
        # them), buffer and tensor attribute on the engine's device
        device = engine.device
        misplaced = _misplaced(engine.modules, device)
        res = run(device, lambda step: engine.train_step(_batch(data, step, cfg, device), StepContext(step)), steps)
        return res.grad_norm, misplaced
    finally:
        engine.close()


def _step_checked(rank: int, world: int, runs: list[tuple[str, list[str]]]):
    """For each (engine, overrides): build, then 2 training steps with the collectives and tensor
    factories checked; returns per run (factory calls without device=, wrong collective devices,
    grad norm, misplaced tensors after the build)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe

    out = []
    for engine, overrides in runs:
        cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + overrides + [f"train.engine={engine}"])
        par = cfg.parallel
        init_parallel(par.tensor_parallel, par.context_parallel, par.pipeline_parallel, seed=cfg.train.seed)
        wrong: list[str] = []
        saved = {name: getattr(dist, name) for name in COLLECTIVES}
        mode = _DefaultDeviceFactories()

        def run(device, step_fn, steps):
            def checked(name, fn):
                def call(*args, **kwargs):
                    items = list(args) + list(kwargs.values())
                    if name == "batch_isend_irecv":
                        items = [op.tensor for op in args[0]]
                    wrong.extend(f"{name}: {t.device} != {device}" for t in _tensors(items) if t.device != device)
                    return fn(*args, **kwargs)
                return call

            for name, fn in saved.items():
                setattr(dist, name, checked(name, fn))
            try:
                with mode:
                    for step in range(steps):
                        res = step_fn(step)
                return res
            finally:
                for name, fn in saved.items():
                    setattr(dist, name, fn)

        try:
            gnorm, misplaced = _engine_steps(cfg, 2, run)
            out.append((sorted(mode.calls), wrong, float(gnorm), misplaced))
        finally:
            parallel_state.destroy_model_parallel()
    disable_cpu_compat()
    return out


def test_collective_tensors_live_on_the_parameters_device():
    # Megatron engine: DP=2 without MoH layers (the aux-loss placeholder case) and CP=2 with them;
    # DeepSpeed engine (ZeRO-3: parameter gathers and partitioned reductions) at CP=2 with them
    cases = [[("megatron", ["model.pattern=ASL", "parallel.context_parallel=1"])],
             [("megatron", ["model.pattern=ASLH", "parallel.context_parallel=2"]),
              ("deepspeed", ["model.pattern=ASLH", "parallel.context_parallel=2", "deepspeed.zero_stage=3"])]]
    for runs in cases:
        for results in run_ranks(_step_checked, 2, runs, timeout=400):
            for (engine, overrides), (calls, wrong, gnorm, misplaced) in zip(runs, results):
                assert calls == [], f"{engine} {overrides}: tensor factories without device= at {calls}"
                assert wrong == [], (engine, overrides, wrong)
                assert misplaced == [], (engine, overrides, misplaced)
                assert gnorm > 0


# ------------------------------------------------------------------ model placement (#20 item 1)
def _placement(cfg, vocab: int, device) -> dict:
    """Each distinct (pipeline stage, TP rank) shard of ``cfg``'s layout built in this process (a fake
    world, as ``--dry-run`` does) for ``device``: its misplaced tensors and its attention kinds."""
    from seqpar.megatron import LightningSelfAttention, MoHSelfAttention, S2CoreAttention, SoftmaxCoreAttention
    from seqpar.train.memory import _fake_world
    from seqpar.train.runtime import build_model

    kinds = {SoftmaxCoreAttention: "A", S2CoreAttention: "S", LightningSelfAttention: "L", MoHSelfAttention: "H"}
    par = cfg.parallel
    world = par.tensor_parallel * par.context_parallel * par.pipeline_parallel
    out = {}
    for pp_rank in range(par.pipeline_parallel):
        for tp_rank in range(par.tensor_parallel):
            with _fake_world(world, tp_rank + par.tensor_parallel * par.context_parallel * pp_rank, cfg):
                chunks = build_model(cfg, vocab, device)
            found = "".join(sorted({k for c in chunks for m in c.modules() for cls, k in kinds.items()
                                    if isinstance(m, cls)}))
            params = sum(1 for c in chunks for _ in c.parameters())
            out[(pp_rank, tp_rank)] = (found, params, _misplaced(chunks, torch.device(device)))
    return out


@pytest.mark.parametrize("engine,layout", [
    ("megatron", ["parallel.tensor_parallel=1"]),
    ("megatron", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.context_parallel=2"]),
    ("deepspeed", ["parallel.tensor_parallel=2", "parallel.context_parallel=2", "train.engine=deepspeed"]),
], ids=["megatron-1rank", "megatron-tp2-pp2-cp2", "deepspeed-tp2-cp2"])
def test_every_chunk_is_built_on_the_target_device(engine, layout):
    from seqpar.train.config import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + ["model.pattern=ASLH"] + layout)
    shards = _placement(cfg, 64, "meta")
    par = cfg.parallel
    assert len(shards) == par.tensor_parallel * par.pipeline_parallel
    # the stages hold every kind between them: A S on the first stage of PP=2, L H on the second
    assert set("".join(found for found, _, _ in shards.values())) == set("ASLH")
    for shard, (found, params, misplaced) in shards.items():
        assert params > 0 and found, shard
        assert misplaced == [], (engine, shard, misplaced)


def test_initialisation_is_on_the_cpu_whatever_the_device(monkeypatch):
    # megatron's CUDA initialisation draws each TP rank's slice from that rank's CUDA generator: the
    # TP=1 and TP=2 models would differ on a GPU. The config is the CPU one with CUDA present too
    from dataclasses import replace

    from seqpar.models import preset, transformer_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert transformer_config(replace(preset("tiny"), pattern="ASLH")).use_cpu_initialization


# ------------------------------------------------- torch AdamW's step on resume (#20 item 4)
def test_torch_adamw_step_survives_loading_without_the_cpu_shim(tmp_path):
    """megatron's fully_reshardable loader (``load_parameter_state_from_fs_model_space``, the GPU path)
    hands ``_set_main_param_and_optimizer_states`` no ``step``; with CPU compat turned off (as on a GPU)
    the load keeps each parameter's AdamW step and takes every other state from the checkpoint."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from seqpar.megatron import destroy_parallel, disable_cpu_compat, init_parallel
    from seqpar.train import checkpoint
    from seqpar.train.config import load_recipe
    from seqpar.train.megatron_engine import build_engine

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml",
                      BASE + ["model.pattern=AL", "parallel.context_parallel=1", "optim.distributed=true",
                              "model.dtype=bf16"])
    # one gloo rank in this process (the distributed optimizer needs real groups; no spawn needed)
    init_parallel(1, 1, seed=cfg.train.seed, init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        opt = build_engine(cfg, 64).optimizer
        checkpoint.init_optimizer_state(opt)  # AdamW state: step, exp_avg, exp_avg_sq
        disable_cpu_compat()  # nothing of the CPU shim is left (a GPU run never has it)
        subs = [o for o in getattr(opt, "chained_optimizers", [opt]) if isinstance(o, DistributedOptimizer)]
        assert subs
        for sub in subs:
            params = [p for maps in sub.gbuf_ranges for buckets in maps.values() for b in buckets
                      for p in b["param_map"]]  # the loader's order
            before = [sub._get_main_param_and_optimizer_states(p) for p in params]
            steps = [float(t["step"]) for t in before]
            saved = [{"fp32_param": t["param"] + 1, "exp_avg": t["exp_avg"] + 2, "exp_avg_sq": t["exp_avg_sq"] + 3,
                      "step": torch.tensor(99.0)} for t in before]
            sub.load_parameter_state_from_fs_model_space(saved)
            for p, s, step in zip(params, saved, steps):
                got = sub._get_main_param_and_optimizer_states(p)
                assert float(got["step"]) == step  # megatron restores step from the param groups instead
                for k, src in (("param", "fp32_param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
                    assert torch.equal(got[k], s[src]), k
    finally:
        disable_cpu_compat()
        destroy_parallel()


def _engine_facts(rank: int, world: int, overrides: list[str]):
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.megatron_engine import build_engine, train_step
    from seqpar.train.runtime import param_device

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
