"""python -m seqpar.train RECIPE.yaml [--set a.b=v ...] [--check | --dry-run] [--resume]  (also seqpar-train)

Launch multi-process runs with torchrun (see launchers/torchrun.sh); a single process runs with a
world of 1. Every recipe error names its field and is raised before any process group starts (the
engine's own checks through ``seqpar.train.engine``). The arguments: ``seqpar.train.args``; the run:
``seqpar.train.loop.train``; signals and peer failures: ``seqpar.train.signals``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

from seqpar.train.args import parse_args
from seqpar.known_warnings import filter_known_warnings


def _exit_codes() -> list[tuple[tuple[type, ...], int]]:
    from seqpar.errors import ConfigError
    from seqpar.train.checkpoint import NonFiniteCheckpointError, ResumeError
    from seqpar.train.health import NonFiniteError
    from seqpar.train.integrity import CorruptCheckpointError, UnsafeCheckpointError

    # ConfigError: a recipe value that only the run's setup can judge (e.g. a corpus shorter than one
    # sequence), found on every rank alike
    return [((NonFiniteError, NonFiniteCheckpointError), 3), ((CorruptCheckpointError, UnsafeCheckpointError), 4),
            ((ResumeError, ConfigError), 2)]


def dry_run(cfg, world_size: Optional[int] = None) -> dict:
    """Validate ``cfg`` at ``world_size`` (default TP x CP x PP) and print the engine that would run
    (``train.engine``: Megatron with or without the distributed optimizer, DeepSpeed's ZeRO stage and
    offloads) with its per-rank memory (``seqpar.train.memory``): every distinct (pipeline stage, TP
    rank) shard is built on the meta device in this one process (as that rank of a fake world), which
    must not have a process group yet. With CP, also the scheme of every layer kind (chosen by
    ``parallel.cp_schemes: auto`` or given) with its predicted bytes and time per layer
    (``seqpar.train.cp_plan``; ``rep["cp"]``). Prints on rank 0 (under torchrun every rank computes the
    same report); returns the report."""
    from seqpar.train import cp_plan
    from seqpar.train.memory import format_report, report

    par = cfg.parallel
    world_size = world_size or par.tensor_parallel * par.context_parallel * par.pipeline_parallel
    rep = report(cfg, world_size, cfg.data.vocab_size)
    rep["cp"] = cp_plan.report(cfg, cfg.cp_auto)
    if os.environ.get("RANK", "0") == "0":
        print("\n".join([format_report(rep)] + cp_plan.format_lines(rep["cp"])), flush=True)
    return rep


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    filter_known_warnings()  # megatron-core's Apex / TE notices, non-leaf .grad read, deprecated collectives
    from seqpar.train.config import load_recipe
    from seqpar.train.engine import check_engine

    launched = "WORLD_SIZE" in os.environ
    try:
        # the files the recipe names (data prefixes, tokenizer) are checked too, except for --dry-run (a
        # memory report for a layout, runnable where the data is not)
        cfg = load_recipe(args.recipe, args.overrides, check_files=not args.dry_run)
        par = cfg.parallel
        mp = par.tensor_parallel * par.context_parallel * par.pipeline_parallel
        no_launch = args.dry_run or args.check
        if args.world is not None and (launched or not no_launch):
            raise ValueError("--world is for --check / --dry-run without torchrun (torchrun sets the world size)")
        if args.world is not None and args.world < 1:
            raise ValueError(f"--world={args.world} must be >= 1")
        world = int(os.environ["WORLD_SIZE"]) if launched else (args.world or mp) if no_launch else 1
        if world == 1 and mp > 1:
            raise ValueError(f"parallel.tensor_parallel x context_parallel x pipeline_parallel = {mp} needs {mp} processes: "
                             f"launch with torchrun --nproc-per-node {mp} (or launchers/torchrun.sh), or check the "
                             f"recipe with --check / --dry-run")
        dp = cfg.check_world(world)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if launched and local and cfg.cp_auto is not None and cfg.cp_auto.plan is not None \
                and int(local) != par.gpus_per_node:  # the choice assumed another placement of the CP groups
            raise ValueError(f"parallel.gpus_per_node={par.gpus_per_node}, but this launch runs {local} processes per "
                             f"node (LOCAL_WORLD_SIZE), and parallel.cp_schemes: auto chose for "
                             f"{par.gpus_per_node}; set parallel.gpus_per_node={local}")
        cfg.check_paths()  # every file / folder the recipe names, before any process starts
        if args.check and not cfg.train.overwrite:  # what the run would refuse first
            from seqpar.train.outdir import held_run
            from seqpar.train.signals import resume_mode

            # (a Slurm requeue or torchrun restart resumes by itself: resume_mode)
            held = held_run(cfg.train.out_dir)
            if held and not resume_mode(args.resume, os.path.join(cfg.train.out_dir, "checkpoints")):
                raise ValueError(held)
        if not no_launch:
            cfg.check_environment()
        # the engine's own checks (DeepSpeed: the whole ds_config) before any process group
        check_engine(cfg, dp)
        if not args.dry_run:
            from seqpar.data import prepare

            # data caches (trained tokenizer, dataset indices) built once under a file lock, before any
            # process group, so no collective waits on them; --check only checks the splits
            prepare(cfg, build=not args.check, check=False)
    except (ValueError, OSError) as e:
        # every rank stops here (exit 2, no process group, no traceback); rank 0 says why, once
        if os.environ.get("RANK", "0") == "0":
            lines = str(e).splitlines() or [repr(e)]
            print(f"seqpar-train: invalid recipe {args.recipe}:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        return 2
    if args.check:
        if os.environ.get("RANK", "0") == "0":
            auto = cfg.cp_auto
            note = "" if auto is None else (
                f"# parallel.cp_schemes: auto -> {auto.reason}\n" if auto.plan is None else
                f"# parallel.cp_schemes: auto -> {auto.plan.schemes}, usp_ulysses_degree "
                f"{auto.plan.ulysses_degree} (--dry-run prints the predicted bytes and time)\n")
            print(f"# {args.recipe}, resolved (every field, defaults filled); valid for {world} rank(s)\n"
                  + note + cfg.to_yaml(), end="", flush=True)
        return 0
    if args.dry_run:
        dry_run(cfg, world)
        return 0
    if args.local_rank is not None:  # h13-deepspeed
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch.distributed as dist

    from seqpar.train import signals

    signals.install(cfg)  # SIGTERM/SIGUSR1/SIGINT -> checkpoint at the next step; exit with the torchrun agent
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # torchrun: the recipe's timeout, a fresh store prefix per restart
            signals.init_default_group(cfg)
        else:  # single process without torchrun
            rdv = tempfile.mktemp(prefix="seqpar_rdv_")
            dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=0, world_size=1)
    from seqpar.train.loop import train

    exit_codes = _exit_codes()
    run_errors = tuple(c for classes, _ in exit_codes for c in classes)
    try:
        with signals.guard():  # a failed / timed-out collective -> one message naming the dead rank or host
            signals.start_heartbeat()
            try:
                train(cfg, resume=signals.resume_mode(args.resume, os.path.join(cfg.train.out_dir, "checkpoints")))
            except run_errors as e:  # raised on every rank alike: one message (rank 0), no traceback wall
                code = next(c for classes, c in exit_codes if isinstance(e, classes))
                if dist.get_rank() == 0:
                    print(f"seqpar-train: {e}", file=sys.stderr, flush=True)
                return code
    finally:
        signals.stop_heartbeat()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
