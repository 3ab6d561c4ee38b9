"""seqpar.models: model presets and layer patterns (installed from the top-level ``models/``).

Presets (tiny / 125m / 1b / 7b-like, hybrid patterns such as ``"LLLA"``) arrive with the
Megatron-core integration; this package is importable now so the install layout is fixed.
"""

__all__: list[str] = []
