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


def test_install_pip_sees_the_wheelhouse_only(tmp_path):
    """pip's configuration must not feed the offline install: this machine sets PIP_FIND_LINKS (a folder
    holding torch 2.13.0), clusters set it or a configuration file; ``--no-index`` keeps both."""
    other, wheelhouse = tmp_path / "other", tmp_path / "wheelhouse"
    other.mkdir()
    wheelhouse.mkdir()
    offline.stub_wheel(other, "seqpar-probe", "1.0")
    conf = tmp_path / "xdg" / "pip" / "pip.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[global]\nfind-links = {other}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-index",
           "--find-links", str(wheelhouse), "-d", str(tmp_path / "got"), "seqpar-probe"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    for leak in ({"PIP_FIND_LINKS": str(other)}, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}):
        plain = subprocess.run(cmd, env=dict(base, **leak), capture_output=True, text=True)
        assert plain.returncode == 0, plain.stderr   # --no-index alone still reads the configured folder
        with pytest.MonkeyPatch.context() as mp:
            for k, v in leak.items():
                mp.setenv(k, v)
            env = offline.pip_env(wheelhouse)
        ours = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert ours.returncode != 0 and "seqpar-probe" in ours.stderr, leak


def test_host_versions_outside_the_range_are_named():
    assert offline.out_of_range({"torch": "2.11.0+cu130", "triton": "3.6.0"}) == []
    assert offline.out_of_range({"torch": "2.13.0+cpu", "triton": "3.9.0", "numpy": "1.0"}) == []
    assert offline.out_of_range({"torch": "2.9.1+cu128", "triton": "3.5.1"}) == [
        "torch 2.9.1+cu128 (seqpar: torch>=2.11,<2.14)", "triton 3.5.1 (seqpar: triton>=3.6,<3.10)"]
    assert offline.out_of_range({"torch": "2.14.0"}) == ["torch 2.14.0 (seqpar: torch>=2.11,<2.14)"]


def _host_venv(path: pathlib.Path, torch_version: str = "2.11.0") -> pathlib.Path:
    """A venv (as many GPU images have) holding a package ``seqpar_host_pkg`` and a torch distribution."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = offline.site_packages(path)
    (site / "seqpar_host_pkg.py").write_text("WHERE = 'host'\n")
    info = site / f"torch-{torch_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
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
    old = _host_venv(tmp_path / "old-host", "2.9.1")
    with pytest.raises(offline.OfflineError, match=r"has torch 2.9.1 \(seqpar: torch>=2.11,<2.14\)"):
        offline.install_system(tmp_path / "v4", wheelhouse=None, python=str(old))
    other = tmp_path / "registry-venv"   # a venv made by the registry install must not be reused
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    with pytest.raises(offline.OfflineError, match="not made by `make install TORCH=system`"):
        offline.overlay_venv(str(host), other, with_pip=False)
    assert not list(tmp_path.glob("v[1234]"))   # nothing was created before the refusals
