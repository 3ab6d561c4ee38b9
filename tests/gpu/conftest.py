"""tests/gpu: run by ``make test-gpu`` on a CUDA machine; skipped elsewhere with one reason line.

``SEQPAR_GPU_DRYRUN=1`` runs the same tests on CPU at tiny shapes (Triton interpreter, gloo): a
developer's check that the suite's own code is right. It is not coverage of anything — the real
bf16/fp16 Triton paths, NCCL and the CUDA sync checks only run on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DRYRUN = os.environ.get("SEQPAR_GPU_DRYRUN") == "1"
REASON = "needs CUDA: the GPU suite runs with `make test-gpu` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    if CUDA or DRYRUN:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(here + os.sep):
            item.add_marker(skip)
