"""S2 vs dense attention (SDPA, flex_attention with the same BlockMask, seqpar flash): the ``s2``
suite of the harness, forward and forward + backward.

    python benchmarks/kernels.py [--out runs/bench] [--seqs 4096 8192] [harness options]
    # = python -m seqpar.bench --suites s2 ...   (--bwd is accepted: both modes are always timed)
"""

import sys

from seqpar.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suites", "s2", *[a for a in sys.argv[1:] if a != "--bwd"]]))
