"""tests/gpu: run by ``make test-gpu`` on a CUDA machine; skipped elsewhere with one reason line.

``SEQPAR_GPU_DRYRUN=1`` runs the same tests on CPU at tiny shapes (Triton interpreter, gloo): a
developer's check that the suite's own code is right. It is not coverage of anything — the real
bf16/fp16 Triton paths, NCCL and the CUDA sync checks only run on a GPU.

Run by itself (``make test-gpu``) on a machine with NVIDIA hardware whose torch cannot use it (a
CPU-only wheel, a driver / CUDA mismatch), the suite fails instead of skipping everything: a pass
there would claim GPU coverage that never ran.

Subsets (markers, e.g. ``pytest tests/gpu -m long_context``):

* ``kernels_d128_bf16``: every kernel's forward + backward at head dim 128 in bf16 vs fp64;
* ``long_context``: the 64K / 128K-token launches (1-D grids past 65535 programs per axis, 64-bit
  offsets past 2^31 elements);
* ``syncs``: no host sync in a steady-state step (sync debug mode + ``cp.count_host_syncs``);
* ``multi_gpu``: CP on NCCL across 2 GPUs (skipped with one reason line on one GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from gpu_common import DRYRUN, nvidia_hardware

CUDA = torch.cuda.is_available()
REASON = "needs CUDA: the GPU suite runs with `make test-gpu` on a GPU machine"
MARKERS = {
    "kernels_d128_bf16": "every kernel's forward + backward at head dim 128 in bf16 vs the fp64 reference",
    "long_context": "64K / 128K-token launches (1-D grids, 64-bit offsets)",
    "syncs": "no host sync in a steady-state step",
    "multi_gpu": "CP on NCCL across 2 GPUs",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    if CUDA or DRYRUN:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    ours = [item for item in items if os.path.abspath(str(item.fspath)).startswith(here + os.sep)]
    hardware = nvidia_hardware()
    if hardware and ours and len(ours) == len(items):  # the GPU suite by itself: fail, do not skip
        pytest.exit(f"tests/gpu: NVIDIA hardware is present ({hardware}) but this torch ({torch.__version__}, "
                    f"CUDA {torch.version.cuda or 'none: a CPU-only build'}) cannot use it "
                    f"(torch.cuda.is_available() is False). Install a CUDA build of torch that matches the driver "
                    f"(README: Installing on a GPU cluster) or check the driver with nvidia-smi.", returncode=3)
    skip = pytest.mark.skip(reason=REASON)
    for item in ours:
        item.add_marker(skip)
