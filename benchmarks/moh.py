"""MoH at 25 / 50 / 75 / 100 % active (token, head) pairs vs masked dense SDPA: the ``moh`` suite of
the harness, forward and forward + backward.

    python benchmarks/moh.py [harness options]           # = python -m seqpar.bench --suites moh
"""

import sys

from seqpar.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suites", "moh", *sys.argv[1:]]))
