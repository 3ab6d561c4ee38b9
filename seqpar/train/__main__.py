"""``python -m seqpar.train RECIPE.yaml``."""

import sys

from seqpar.train.cli import main

sys.exit(main())
