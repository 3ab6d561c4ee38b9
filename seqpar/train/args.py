"""The command line of ``seqpar-train`` (``python -m seqpar.train``): one parser, read by the CLI
(``seqpar.train.cli``) and by the Slurm launcher's ``python -m seqpar.train.signals out-dir`` helper,
which accepts the same arguments."""

from __future__ import annotations

import argparse
from typing import Optional

_DESCRIPTION = """Train a seqpar recipe (YAML, see recipes/README.md for every field).

  python -m seqpar.train RECIPE.yaml                      one process (world of 1)
  torchrun --nproc-per-node N -m seqpar.train RECIPE.yaml  N ranks (or launchers/torchrun.sh)
  python -m seqpar.train RECIPE.yaml --check              validate only (exit 0, or 2 with one line per bad field)
  python -m seqpar.train RECIPE.yaml --dry-run            validate the layout, report per-rank param / grad /
                                                          optimizer bytes of every distinct shard (no torchrun)
  ... --resume                                            continue from <train.out_dir>/checkpoints/latest
  ... --resume auto                                       the same if a checkpoint exists, else start fresh
"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="seqpar-train", description=_DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="YAML recipe (see recipes/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a recipe field (value parsed as YAML); repeatable")
    ap.add_argument("--check", action="store_true",
                    help="validate the recipe for its layout (under torchrun: for the launched world; else --world "
                         "or TP x CP ranks) and the files it names, print the resolved recipe as YAML, start nothing")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the recipe and its parallel layout and report the engine that would run "
                         "(Megatron, or DeepSpeed's ZeRO stage and offloads) and its per-rank parameter, gradient "
                         "and optimizer-state bytes (one meta-device model per distinct pipeline-stage x TP "
                         "shard, built in this one process on a fake world; no process group is started)")
    ap.add_argument("--world", type=int, default=None, metavar="N",
                    help="--check / --dry-run without torchrun: the world size to validate and report for "
                         "(default: tensor_parallel x context_parallel x pipeline_parallel)")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, choices=["latest", "auto"],
                    help="continue from <train.out_dir>/checkpoints/latest; '--resume auto' resumes only if it "
                         "exists, else starts fresh (implied after a torchrun restart or a Slurm requeue)")
    # h13-deepspeed: the deepspeed launcher passes --local_rank=N (unless --no_local_rank); LOCAL_RANK is in the env too
    ap.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                    help="set by the deepspeed launcher (same as the LOCAL_RANK environment variable)")
    return ap.parse_args(argv)
