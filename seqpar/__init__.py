"""seqpar: long-context attention beyond softmax, with context parallelism.

The per-rank attention ops live in :mod:`seqpar.kernels` (installed from ``kernels/``);
model presets in :mod:`seqpar.models` (from ``models/``). See README.md.
"""

from seqpar.errors import ConfigError

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__"]
