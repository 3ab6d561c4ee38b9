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
    ap.add_argument("--resume", nargs="?", const="latest", default=None, choices=["latest", "auto"],
                    help="continue from <train.out_dir>/checkpoints/latest; 'auto' resumes only if it exists "
                         "(also implied after a torchrun restart or a Slurm requeue)")
    return ap.parse_args(argv)


def dry_run(cfg) -> None:
    """Start the process groups, build this rank's model on the meta device (any size, no memory)
    and the data pipeline (text is read but the tokenizer is not trained), print a summary."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from seqpar.megatron import init_parallel
    from seqpar.train.loop import build_model

    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.context_parallel, seed=cfg.train.seed,
                  timeout_s=cfg.parallel.distributed_timeout_s)
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
        if dist.get_rank() == 0:
            n = sum(p.numel() for p in model.parameters())
            print(json.dumps({"dry_run": "ok", "world": dist.get_world_size(), "params_per_rank": n,
                              "pattern": cfg.model.layer_pattern,
                              "dp": parallel_state.get_data_parallel_world_size()}), flush=True)
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
        print(f"seqpar-train: invalid recipe {args.recipe}: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from seqpar.train import signals

    signals.install(cfg)  # SIGTERM/SIGUSR1/SIGINT -> checkpoint at the next step; exit with the torchrun agent
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # torchrun: recipe's timeout, a fresh store prefix per restart
            signals.init_default_group(cfg)
        else:  # single process without torchrun
            rdv = tempfile.mktemp(prefix="seqpar_rdv_")
            dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    from seqpar.train.loop import train

    try:
        with signals.guard():  # a failed / timed-out collective -> one message naming the dead rank or host
            signals.start_heartbeat()
            if args.dry_run:
                dry_run(cfg)
            else:
                ckpt_dir = os.path.join(cfg.train.out_dir, "checkpoints")
                train(cfg, resume=signals.resume_mode(args.resume, ckpt_dir))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
