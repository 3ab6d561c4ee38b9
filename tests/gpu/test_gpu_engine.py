"""Both engines' model on the GPU, in this process on one rank (issue #20 items 1, 2, 4, 6):

- ``build_model`` for the GPU holds bit for bit the model built for the CPU (initialisation runs on
  the CPU whatever the device), with every parameter, buffer and tensor attribute on the GPU;
- megatron's DDP and optimizers take it: bf16 at DP x CP = 1 (``Float16OptimizerWithFloat16Params``,
  which refused CPU parameters with "Wrapped parameters must be one of torch.cuda.*") and fp32 with
  the distributed optimizer, whose checkpoint resumes (torch AdamW's ``step`` kept without the CPU
  shim) with the losses of the uninterrupted run;
- the DeepSpeed engine steps under ZeRO-3 (its step's collectives on the GPU).

The CPU suite asserts the same placement for ``device="meta"`` (tests/test_engine_devices.py); this
file is where NCCL and CUDA see it.
"""

from __future__ import annotations

import math
import os
import pathlib

import pytest
import torch
import torch.distributed as dist

from gpu_common import DEVICE, seq

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = ["data.dataset=mqar", f"data.seq_len={seq(2048)}", "data.global_batch=2", "data.vocab_size=64", "data.mqar_pairs=4",
        "data.mqar_queries=4", "optim.warmup_steps=1", "train.progress=false", "train.steps=4",
        "parallel.context_parallel=1", "model.pattern=ASLH", "model.s2_block_size=16", "model.s2_local_blocks=1",
        "model.s2_vert_stride=2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One rank of the default process group (NCCL on CUDA); megatron's groups are made per test."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    os.environ.setdefault("LOCAL_RANK", "0")
    rdv = tmp_path_factory.mktemp("rdv")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{rdv}/rdv",
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    from seqpar.megatron import disable_cpu_compat

    disable_cpu_compat()  # the CPU dry run (SEQPAR_GPU_DRYRUN=1) enabled it through init_parallel


def _cfg(tmp_path, *extra: str):
    from seqpar.train.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", BASE + [f"train.out_dir={tmp_path}", *extra])


def test_gpu_model_is_the_cpu_model_and_all_on_the_gpu(world, tmp_path):
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.runtime import build_model

    cfg = _cfg(tmp_path, "model.dtype=bf16")
    init_parallel(1, 1, seed=cfg.train.seed)
    try:
        gpu = build_model(cfg, 64)[0]  # the default device: the current CUDA device
        cpu = build_model(cfg, 64, "cpu")[0]
    finally:
        parallel_state.destroy_model_parallel()
    on = {t.device for t in [*gpu.parameters(), *gpu.buffers()]}
    on |= {v.device for m in gpu.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)}
    assert on == {torch.device(DEVICE.type, 0) if DEVICE.type == "cuda" else DEVICE}, on
    ref = dict(cpu.named_parameters())
    for name, p in gpu.named_parameters():
        assert torch.equal(p.cpu(), ref[name]), name


def test_megatron_engine_trains_bf16_at_dp_cp_1(world, tmp_path):
    # the crash: Float16OptimizerWithFloat16Params (bf16, DP x CP = 1) refused CPU parameters
    from seqpar.train.loop import train

    losses = train(_cfg(tmp_path, "model.dtype=bf16", "train.steps=2"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_distributed_optimizer_checkpoint_resumes_on_the_gpu(world, tmp_path):
    # megatron's fully_reshardable loader on CUDA (load_parameter_state_from_fs_model_space) with torch
    # AdamW: KeyError 'step' without seqpar.megatron.optimizer; resumed losses = uninterrupted ones
    from seqpar.train.loop import train

    extra = ("optim.distributed=true",)
    full = train(_cfg(tmp_path / "full", *extra))
    part = train(_cfg(tmp_path / "split", *extra), stop_after=2)
    rest = train(_cfg(tmp_path / "split", *extra), resume=True)
    assert all(math.isfinite(x) for x in full)
    assert part + rest == pytest.approx(full, rel=1e-3)


def test_deepspeed_zero3_trains_on_the_gpu(world, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed in this environment")
    from seqpar.train.loop import train

    losses = train(_cfg(tmp_path, "train.engine=deepspeed", "deepspeed.zero_stage=3", "train.steps=2"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
