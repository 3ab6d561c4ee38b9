"""Lightning vs softmax attention (SDPA, seqpar flash) and fla's chunk_simple_gla: the ``lightning``
suite of the harness, forward and forward + backward.

    python benchmarks/lightning.py [harness options]     # = python -m seqpar.bench --suites lightning
"""

import sys

from seqpar.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suites", "lightning", *sys.argv[1:]]))
