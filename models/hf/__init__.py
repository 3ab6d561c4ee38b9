"""Hugging Face modeling code for exported seqpar models (``seqpar.models.hf``).

``configuration_seqpar.py`` and ``modeling_seqpar.py`` are the templates that
``python -m seqpar.export.hf`` copies verbatim into an export folder (loaded there with
``trust_remote_code=True`` through ``auto_map``). They depend on torch and transformers only; when
``seqpar.kernels`` is importable and the tensors are on CUDA they call its Triton kernels.
"""

from __future__ import annotations

import pathlib

TEMPLATE_DIR = pathlib.Path(__file__).resolve().parent
TEMPLATE_FILES = ("configuration_seqpar.py", "modeling_seqpar.py")

__all__ = ["TEMPLATE_DIR", "TEMPLATE_FILES"]
