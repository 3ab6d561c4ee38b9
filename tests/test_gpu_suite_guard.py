"""``make test-gpu`` fails (not passes with every test skipped) when NVIDIA hardware is present but the
venv's torch cannot use it (without such hardware it skips with one reason line, as ``make test`` shows).

The hardware probe (tests/gpu/gpu_common.py: device files ``/dev/nvidia<N>`` or ``nvidia-smi -L``)
is pointed at a stand-in device file here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees CUDA: the guard cannot fire")


def _gpu_suite(tmp_path, *args, device_glob=None):
    env = {k: v for k, v in os.environ.items() if k != "SEQPAR_GPU_DRYRUN"}
    env["SEQPAR_NVIDIA_DEVICE_GLOB"] = device_glob or str(tmp_path / "no-such-device*")
    env["PATH"] = os.path.dirname(sys.executable)  # no nvidia-smi on the path
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_suite_fails_when_hardware_is_present_but_torch_cannot_use_it(tmp_path):
    (tmp_path / "nvidia0").write_text("")
    out = _gpu_suite(tmp_path, "--collect-only", "tests/gpu/test_gpu_syncs.py",
                     device_glob=str(tmp_path / "nvidia[0-9]*"))
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "NVIDIA hardware is present" in out.stdout + out.stderr and "cannot use it" in out.stdout + out.stderr
