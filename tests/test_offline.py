"""seqpar.offline: the pieces of make wheelhouse / make install TORCH=system that need no registry.

The whole flow (a wheelhouse from the registry, then an install with no network over a venv that
holds torch 2.11 + triton 3.6, then the lower-bound tests in it) is `make check-offline`, which CI runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from seqpar import offline


def test_requirements_expand_extras_and_leave_torch_to_the_host():
    reqs = offline.project_requirements(["train", "deepspeed", "test"])
    names = [offline._req_name(r) for r in reqs]
    assert {"megatron-core", "pydantic", "deepspeed", "pytest", "pytest-xdist", "numpy"} <= set(names)
    assert "torch" not in names and "triton" not in names and not any(n == "seqpar" for n in names)
    assert len(names) == len(set(names))
    assert "lm-eval" not in names   # export's heavy stack only when asked for
    assert "lm-eval" in [offline._req_name(r) for r in offline.project_requirements(["export"])]
    with pytest.raises(offline.OfflineError, match="unknown extra 'gpu'"):
        offline.project_requirements(["gpu"])


def test_cross_target_flags():
    flags = offline.target_flags("3.12", offline.manylinux_platforms("2.28"))
    assert flags[:4] == ["--python-version", "3.12", "--implementation", "cp"]
    assert ["--abi", "cp312"] == flags[4:6]
    plats = [flags[i + 1] for i, f in enumerate(flags) if f == "--platform"]
    assert plats[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in plats and "manylinux2014_x86_64" in plats
    assert "manylinux_2_29_x86_64" not in plats
    assert offline.target_flags(None, []) == []
    with pytest.raises(offline.OfflineError, match="expected major.minor"):
        offline.target_flags("312", [])


def test_placeholder_wheel_is_a_valid_empty_distribution(tmp_path):
    whl = offline.stub_wheel(tmp_path, "torch", "2.11.0")
    assert whl.name == "torch-2.11.0+seqparstub-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        meta = z.read("torch-2.11.0+seqparstub.dist-info/METADATA").decode()
        assert "Version: 2.11.0+seqparstub" in meta and "Requires-Dist" not in meta
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                           "--no-deps", "--target", str(target), str(whl)], capture_output=True, text=True,
                          env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))
    assert proc.returncode == 0, proc.stderr
    assert (target / "torch-2.11.0+seqparstub.dist-info" / "RECORD").exists()


def _host_venv(path: pathlib.Path) -> pathlib.Path:
    """A venv (as many GPU images have) holding a package ``seqpar_host_pkg`` and a torch distribution."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = offline.site_packages(path)
    (site / "seqpar_host_pkg.py").write_text("WHERE = 'host'\n")
    info = site / "torch-2.11.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    return path / "bin" / "python"


def test_overlay_venv_sees_a_venv_interpreters_packages(tmp_path):
    """PY may be a venv's interpreter: the project venv sees that venv's packages (``--system-site-packages``
    would reach only its base interpreter's) and keeps its own first."""
    host = _host_venv(tmp_path / "host")
    view = offline.interpreter_view(str(host))
    assert view["venv"] is True and view["dists"]["torch"] == "2.11.0"
    assert str(offline.site_packages(tmp_path / "host")) in view["paths"]
    plain = tmp_path / "plain"
    subprocess.run([str(host), "-m", "venv", "--without-pip", "--system-site-packages", str(plain)], check=True)
    assert subprocess.run([str(plain / "bin" / "python"), "-c", "import seqpar_host_pkg"],
                          capture_output=True).returncode != 0   # why the overlay is needed
    proj = tmp_path / "proj"
    vpy = offline.overlay_venv(str(host), proj, with_pip=False)
    (offline.site_packages(proj) / "seqpar_project_pkg.py").write_text("WHERE = 'venv'\n")
    code = ("import json, sys, seqpar_host_pkg, seqpar_project_pkg; "
            "print(json.dumps([sys.prefix, seqpar_host_pkg.__file__, sys.path]))")
    prefix, host_file, path = json.loads(subprocess.run([vpy, "-c", code], capture_output=True, text=True,
                                                        check=True).stdout)
    assert pathlib.Path(prefix) == proj and pathlib.Path(host_file).is_relative_to(tmp_path / "host")
    assert path.index(str(offline.site_packages(proj))) < path.index(str(offline.site_packages(tmp_path / "host")))
    assert offline.interpreter_view(vpy)["dists"]["torch"] == "2.11.0"   # pip in the venv sees the host's torch


def test_install_refusals_name_the_fix(tmp_path):
    host = _host_venv(tmp_path / "host")
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    with pytest.raises(offline.OfflineError, match="has no torch.*point PY at the interpreter"):
        offline.install_system(tmp_path / "v1", wheelhouse=None, python=str(bare / "bin" / "python"))
    wh = tmp_path / "wh"
    wh.mkdir()
    with pytest.raises(offline.OfflineError, match="no seqpar-wheelhouse.json there"):
        offline.install_system(tmp_path / "v2", wheelhouse=wh, python=str(host))
    (wh / offline.MANIFEST).write_text(json.dumps({"python_version": "3.99", "extras": ["train"], "wheels": []}))
    with pytest.raises(offline.OfflineError, match="built for Python 3.99.*rebuild it with PYVER="):
        offline.install_system(tmp_path / "v3", wheelhouse=wh, python=str(host))
    other = tmp_path / "registry-venv"   # a venv made by the registry install must not be reused
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    with pytest.raises(offline.OfflineError, match="not made by `make install TORCH=system`"):
        offline.overlay_venv(str(host), other, with_pip=False)
    assert not list(tmp_path.glob("v[123]"))   # nothing was created before the refusals
