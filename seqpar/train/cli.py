"""``python -m seqpar.train RECIPE.yaml [--set a.b=v ...] [--dry-run] [--resume]`` (also ``seqpar-train``).

Launch multi-process runs with torchrun (see launchers/torchrun.sh); a single process runs with a
world of 1. Every recipe error names its field and is raised before any process group starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seqpar-train", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="YAML recipe (see recipes/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a recipe field (value parsed as YAML); repeatable")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate, start the process groups and build the model and data, then exit")
    ap.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/checkpoints/latest")
    return ap.parse_args(argv)


def dry_run(cfg) -> dict:
    """Start the process groups, build this rank's model on the meta device (any size, no memory)
    and the data pipeline (text is read but the tokenizer is not trained), print a summary."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.loop import build_model

    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed)
    try:
        if cfg.data.dataset == "mqar":
            from seqpar.data import MQARDataset
            d = cfg.data
            MQARDataset(d.vocab_size, d.seq_len, d.mqar_pairs, d.mqar_queries).batch(0, d.global_batch)
        else:
            from seqpar.data import load_text
            load_text(cfg.data.text_files, min(cfg.data.max_bytes, 100_000))
        with torch.device("meta"):
            model = build_model(cfg, cfg.data.vocab_size)
        n = sum(p.numel() for p in model.parameters())
        tc = model.config
        info = {"dry_run": "ok", "world": dist.get_world_size(), "params_per_rank": n,
                "pattern": cfg.model.layer_pattern, "layers": tc.num_layers, "hidden": tc.hidden_size,
                "heads": tc.num_attention_heads, "kv_heads": tc.num_query_groups,
                "dp": parallel_state.get_data_parallel_world_size()}
        if dist.get_rank() == 0:
            print(json.dumps(info), flush=True)
        return info
    finally:
        parallel_state.destroy_model_parallel()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # megatron-core warns at several import sites that Apex / Transformer Engine are absent; both are
    # optional fused-kernel providers with torch fallbacks, so the trainer's console keeps quiet about it
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* (is|are) not installed",
                            category=UserWarning)
    from seqpar.train.config import load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        cfg.check_world(int(os.environ.get("WORLD_SIZE", 1)))
    except (ValueError, OSError) as e:
        # every rank stops here (exit 2, no process group, no traceback); rank 0 says why, once
        if os.environ.get("RANK", "0") == "0":
            lines = str(e).splitlines() or [repr(e)]
            print(f"seqpar-train: invalid recipe {args.recipe}:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        else:  # single process without torchrun
            rdv = tempfile.mktemp(prefix="seqpar_rdv_")
            dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    from seqpar.train.loop import train

    try:
        if args.dry_run:
            dry_run(cfg)
        else:
            train(cfg, resume=args.resume)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
