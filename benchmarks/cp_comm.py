"""Context parallelism per kind and scheme: comm ledger == cp.scheme_cost, bytes per rank, compute per
rank and the modelled step time: the ``cp`` suite of the harness.

    python benchmarks/cp_comm.py [harness options]       # = python -m seqpar.bench --suites cp
"""

import sys

from seqpar.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suites", "cp", *sys.argv[1:]]))
