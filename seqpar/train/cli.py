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
                    help="validate the recipe and its parallel layout and report per-rank parameter, gradient "
                         "and optimizer-state bytes (one meta-device model per distinct shard, in this process; "
                         "no process group is started), then exit")
    ap.add_argument("--world-size", type=int, default=None, metavar="N",
                    help="--dry-run: the world to validate (default: $WORLD_SIZE, else TP x CP x PP, i.e. DP=1)")
    ap.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/checkpoints/latest")
    return ap.parse_args(argv)


def dry_run(cfg, world_size: Optional[int] = None) -> dict:
    """Validate ``cfg`` at ``world_size`` (default TP x CP x PP) and print its per-rank memory
    (``seqpar.train.memory``): every distinct (pipeline stage, TP rank) shard is built on the meta
    device in this one process, which must not have a process group yet. Returns the report."""
    from seqpar.train.memory import format_report, report

    par = cfg.parallel
    world_size = world_size or par.tensor_parallel * par.context_parallel * par.pipeline_parallel
    rep = report(cfg, world_size, cfg.data.vocab_size)
    print(format_report(rep), flush=True)
    return rep


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # megatron-core warns at several import sites that Apex / Transformer Engine are absent; both are
    # optional fused-kernel providers with torch fallbacks, so the trainer's console keeps quiet about it
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* (is|are) not installed",
                            category=UserWarning)
    from seqpar.train.config import load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        par = cfg.parallel
        world = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or (
            par.tensor_parallel * par.context_parallel * par.pipeline_parallel if args.dry_run else 1)
        cfg.check_world(world)
        if args.dry_run:
            dry_run(cfg, world)
            return 0
    except (ValueError, OSError) as e:
        print(f"seqpar-train: invalid recipe {args.recipe}: {e}", file=sys.stderr)
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
        train(cfg, resume=args.resume)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
