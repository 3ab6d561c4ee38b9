"""Activation memory per layer kind with ``model.recompute`` none / selective / full, on the training
engine's own model (megatron-core GPTModel in DDP, one rank).

Measured: the bytes of the tensors the decoder saves for backward during one training forward (what
stays alive until backward; parameters and duplicates of one storage counted once, via
``torch.autograd.graph.saved_tensors_hooks``), per layer; on CUDA also the peak allocated memory of a
whole step (``torch.cuda.max_memory_allocated``). With "full" each layer keeps only its input (one
layer's activations are rebuilt at a time in backward); "selective" drops the core-attention
intermediates of A / S layers (megatron's ``core_attn`` recompute).

    python benchmarks/engine_recompute.py [--seq 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _util import device_name, print_table, write_json  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = {"A": ("none", "selective", "full"), "S": ("none", "selective", "full"), "L": ("none", "full"),
         "H": ("none", "full")}


def _saved_bytes_per_layer(letter: str, mode: str, seq: int) -> tuple[float, float]:
    from megatron.core import parallel_state

    from seqpar.megatron import disable_cpu_compat, init_parallel
    from seqpar.train.config import load_recipe
    from seqpar.train.loop import _batch, build_data
    from seqpar.train.megatron_engine import build_engine, train_step
    from seqpar.train.engine import Batch
    from seqpar.train.runtime import micro_batches, param_device

    cfg = load_recipe(ROOT / "recipes" / "tiny_hybrid_cp2.yaml", [
        "model.preset=tiny", f"model.pattern={letter}", f"model.recompute={mode}", "data.dataset=mqar",
        f"data.seq_len={seq}", "data.global_batch=1", "data.vocab_size=64", "parallel.context_parallel=1",
        "parallel.backend=auto", "train.progress=false"])
    init_parallel(1, 1, seed=cfg.train.seed)
    try:
        data, vocab = build_data(cfg)
        engine = build_engine(cfg, vocab)
        model = engine.model[0]
        model.train()
        device = param_device(engine.model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[int] = set()
        inside = [False]
        total = [0]

        def pack(t: torch.Tensor):
            if inside[0]:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params and ptr not in seen:
                    seen.add(ptr)
                    total[0] += t.untyped_storage().nbytes()
            return t

        decoder = model.module.decoder
        decoder.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
        decoder.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))
        tokens, labels, mask = _batch(data, 0, cfg, device)
        batch = micro_batches(Batch(tokens, labels, mask), 0)[0]  # every row one document
        pos = torch.arange(seq, device=device).expand_as(batch["tokens"])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch["tokens"], pos, None, labels=batch["labels"])
        del out
        peak = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            train_step(engine, tokens, labels, mask)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return total[0] / decoder.num_layers_per_pipeline_rank / 2 ** 20, peak
    finally:
        parallel_state.destroy_model_parallel()
        if not torch.cuda.is_available():
            disable_cpu_compat()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rdv = tempfile.mktemp(prefix="seqpar_bench_rdv_")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{rdv}",
                            rank=0, world_size=1)
    rows = []
    try:
        for letter, modes in MODES.items():
            base = None
            for mode in modes:
                mib, peak = _saved_bytes_per_layer(letter, mode, args.seq)
                base = mib if base is None else base
                row = {"kind": letter, "recompute": mode, "saved_MiB_per_layer": mib,
                       "vs_none": mib / base if base else 0.0}
                if torch.cuda.is_available():
                    row["step_peak_MiB"] = peak
                rows.append(row)
    finally:
        dist.destroy_process_group()
    title = (f"activation memory per layer (tiny preset: hidden 64, 4 heads; seq {args.seq}, batch 1) "
             f"on {device_name('cuda' if torch.cuda.is_available() else 'cpu')}")
    print_table(rows, title)
    write_json(args.json, {"seq": args.seq, "rows": rows})


if __name__ == "__main__":
    main()
