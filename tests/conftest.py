"""Test set-up shared by the whole suite.

Triton decides at import time whether a ``@triton.jit`` function is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be in the environment before any seqpar kernel module is imported.
``make test`` sets it; this default makes a bare ``pytest`` behave the same on a CPU machine.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
