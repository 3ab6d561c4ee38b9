"""The training loop: AdamW + warmup/cosine, grad clipping, token-weighted loss over DP x CP, MoH
aux loss, tensorboard scalars, a tqdm bar on rank 0, atomic checkpoints and exact resume."""

from __future__ import annotations

import math
import pathlib
import sys
import time
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as tp_random

from seqpar.models import build_gpt, preset, transformer_config
from seqpar.megatron import init_parallel
from seqpar.train import checkpoint, health, signals
from seqpar.train.config import RunConfig
from seqpar.train.step import forward_backward, local_batch


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to optim.lr, then cosine to optim.min_lr at train.steps (step is 0-based)."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Global grad norm over the whole model (TP shards counted once) and in-place clipping."""
    sq = torch.zeros((), dtype=torch.float64)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def build_data(cfg: RunConfig):
    """Dataset and vocabulary size (the tokenizer is trained once by rank 0, then loaded by all)."""
    from seqpar.data import MQARDataset, PackedTextDataset, get_tokenizer, load_documents, load_text

    d = cfg.data
    if d.dataset == "mqar":
        return MQARDataset(d.vocab_size, d.seq_len, d.mqar_pairs, d.mqar_queries, seed=cfg.train.seed), d.vocab_size
    text = load_text(d.text_files, d.max_bytes)
    cache = d.cache_dir or None
    if dist.get_rank() == 0:
        get_tokenizer(d.vocab_size, text, cache)
    dist.barrier()
    sp = get_tokenizer(d.vocab_size, text, cache)
    docs = load_documents(d.text_files, d.max_bytes)  # each document followed by EOS
    ds = PackedTextDataset.from_documents(sp, docs, d.seq_len, seed=cfg.train.seed)
    ds.tokenizer_model = sp.serialized_model_proto()  # saved in every checkpoint (export needs it)
    return ds, sp.vocab_size()


def build_model(cfg: RunConfig, vocab_size: int):
    p = cfg.model.shape  # the preset with the recipe's shape overrides and pattern
    m = cfg.model
    dtype = torch.bfloat16 if m.dtype == "bf16" else torch.float32
    tcfg = transformer_config(
        p, tensor_model_parallel_size=cfg.parallel.tensor_parallel,
        context_parallel_size=cfg.parallel.context_parallel, cp_schemes=cfg.parallel.cp_schemes,
        usp_ulysses_degree=cfg.parallel.usp_ulysses_degree,
        seqpar_backend=cfg.parallel.backend, s2_block_size=m.s2_block_size, s2_local_blocks=m.s2_local_blocks,
        s2_vert_stride=m.s2_vert_stride, moh_num_shared_heads=m.moh_num_shared_heads, moh_top_k=m.moh_top_k,
        moh_aux_loss_coef=m.moh_aux_loss_coef, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = build_gpt(p, tcfg, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_len)
    return model.to(dtype)


class MasterParams:
    """fp32 master copies of low-precision parameters (Megatron's Float16Optimizer scheme): the
    optimizer steps the fp32 copies, the model gets them rounded back. Identity for fp32 models."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.lowp = any(p.dtype != torch.float32 for p in self.model_params)
        self.params = ([torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]
                       if self.lowp else self.model_params)

    def grads_to_master(self) -> None:
        if self.lowp:
            for m, p in zip(self.params, self.model_params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def master_to_model(self) -> None:
        if self.lowp:
            with torch.no_grad():
                for m, p in zip(self.params, self.model_params):
                    p.copy_(m)


class AttentionTimer:
    """Forward wall time per attention kind (hooks on the seqpar attention modules; on CUDA each
    measurement synchronises, so it is off unless train.time_attention is set)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from seqpar.megatron.attention import (LightningSelfAttention, MoHCoreAttention, S2CoreAttention,
                                               SoftmaxCoreAttention)

        kinds = {SoftmaxCoreAttention: "softmax", S2CoreAttention: "s2", MoHCoreAttention: "moh",
                 LightningSelfAttention: "lightning"}
        self.totals: dict[str, float] = {}
        self._start: dict[int, float] = {}
        for mod in model.modules():
            kind = next((k for cls, k in kinds.items() if isinstance(mod, cls)), None)
            if kind is not None:
                mod.register_forward_pre_hook(self._pre)
                mod.register_forward_hook(lambda m, i, o, kind=kind: self._post(m, kind))

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, mod: torch.nn.Module, inputs: Any) -> None:
        self._sync()
        self._start[id(mod)] = time.perf_counter()

    def _post(self, mod: torch.nn.Module, kind: str) -> None:
        self._sync()
        self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - self._start.pop(id(mod))

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def _rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(), "tracker": tp_random.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["cpu"])
    tp_random.get_cuda_rng_tracker().set_states(s["tracker"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state(s["cuda"])


def _tensorboard_cmd() -> str:
    """``tensorboard`` next to this interpreter (the venv's) when it is there, else the bare name."""
    exe = pathlib.Path(sys.executable).parent / "tensorboard"
    return str(exe) if exe.exists() else "tensorboard"


def train(cfg: RunConfig, *, resume: bool = False, stop_after: Optional[int] = None) -> list[float]:
    """Run the recipe; returns the per-step losses of this run (identical on every rank).

    ``resume`` continues from ``<out_dir>/checkpoints/latest``. ``stop_after`` ends (with a
    checkpoint) after that many steps of this run, e.g. to test resume.
    """
    world = dist.get_world_size() if dist.is_initialized() else None
    if world is not None:
        cfg.check_world(world)
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed,
                  timeout_s=cfg.parallel.distributed_timeout_s)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    rank0 = dist.get_rank() == 0
    data, vocab = build_data(cfg)
    model = build_model(cfg, vocab)
    o = cfg.optim
    master = MasterParams(model)
    opt = torch.optim.AdamW(master.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    out = pathlib.Path(cfg.train.out_dir)
    ckpt_dir = out / "checkpoints"
    start = 0
    checkpoint.prepare_out_dir(out, resume=resume, overwrite=cfg.train.overwrite)  # h16: no silent mixing of runs
    if resume:
        path = checkpoint.resumable(ckpt_dir, cfg.train.on_corrupt_checkpoint)  # h16: manifest-verified
        state = checkpoint.load(path, model, opt, master, config=cfg.to_dict())
        if state["rng"] is not None:
            _set_rng_state(state["rng"])
        elif rank0:
            print(f"[seqpar.train] {path} was written with parallel layout {state['layout']}; "
                  f"RNG states not restored (they are per rank)", flush=True)
        start = state["step"]
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    writer = bar = None
    if rank0:
        from torch.utils.tensorboard import SummaryWriter
        # scalars of step s are logged at s + 1, so the checkpoint's own last point (start) is kept
        writer = SummaryWriter(str(out / "tb"), purge_step=start + 1)
        if cfg.train.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    timer = AttentionTimer(model) if cfg.train.time_attention else None
    monitor = health.HealthMonitor.from_config(cfg, model)  # h16: NaN/inf stop or skip (seqpar/train/health.py)
    losses = []
    model.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens, labels, mask = (t.to(device) for t in data.batch(step, cfg.data.global_batch, dp_rank, dp))
        with monitor.guard(step):
            res = forward_backward(model, local_batch(tokens, labels, mask))
        gnorm = clip_grads(model, o.grad_clip)
        if monitor.check(step, res.loss, gnorm):  # False: a non-finite step skipped (train.skip_nonfinite_steps)
            master.grads_to_master()
            opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        master.master_to_model()
        losses.append(res.loss)
        dt = time.perf_counter() - t0
        if rank0 and (step + 1) % cfg.train.log_every == 0:
            for k, v in {"loss": res.loss, "lr": lr, "grad_norm": gnorm, "aux_loss": res.aux_loss,
                         "tokens_per_s": res.tokens / dt, "skipped_steps": monitor.skipped}.items():
                writer.add_scalar(f"train/{k}", v, step + 1)
            for kind, sec in (timer.pop() if timer else {}).items():
                writer.add_scalar(f"attention_fwd_ms/{kind}", 1e3 * sec, step + 1)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.3f}", aux=f"{res.aux_loss:.3g}", lr=f"{lr:.2e}")
        stop = signals.stop_requested()  # a SIGTERM/SIGUSR1/SIGINT on any rank: save now, then exit (all ranks)
        last = step + 1 == end or stop
        if last or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            if writer is not None:  # h16: the scalars up to a checkpoint are on disk before it is `latest`
                writer.flush()
            saved = checkpoint.save(ckpt_dir, step + 1, model, opt, master, rng=_rng_state(), config=cfg.to_dict(),
                                    tokenizer_model=getattr(data, "tokenizer_model", None))
        if stop:
            signals.stopped(step + 1, saved)
            break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
        w = max(1, min(10, len(losses) // 4))  # mean of the first / last few steps: the trend, not noise
        trend = (f"loss {sum(losses[:w]) / w:.4f} (first {w} steps) -> {sum(losses[-w:]) / w:.4f} (last {w})"
                 if losses else "no steps run")
        print(f"[seqpar.train] steps {start}->{end}, {trend}\n"
              f"  checkpoint:  {checkpoint.latest(ckpt_dir)}\n"
              f"  export (HF): {sys.executable} -m seqpar.export.hf {out} {out / 'hf'}\n"
              f"  tensorboard: {_tensorboard_cmd()} --logdir {out / 'tb'}", flush=True)
    parallel_state.destroy_model_parallel()
    signals.raise_if_stopped()  # SystemExit(signals.EXIT_INTERRUPTED) after a signal stopped the loop
    return losses
