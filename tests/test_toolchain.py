"""seqpar.toolchain: what Triton's CUDA launcher build needs, one line each with the fix (issue #20 item 5)."""

from __future__ import annotations

import pathlib
import sys

import pytest

from seqpar import toolchain


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_missing_compiler_and_headers_are_one_line_each_with_the_fix(no_compiler, monkeypatch, tmp_path, capsys):
    inc = tmp_path / "include"
    inc.mkdir()
    monkeypatch.setattr(toolchain, "python_include_dir", lambda: str(inc))
    problems = toolchain.check(cuda=False)
    assert [p.what.split(":")[0] for p in problems] == ["no C compiler", f"Python.h not found in {inc} (Triton's CUDA launcher includes the headers of {sys.executable})"]
    assert "apt-get install gcc" in problems[0].fix and "CC=" in problems[0].fix
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python{v}-dev" in problems[1].fix and f"python{v}-devel" in problems[1].fix
    # a machine without CUDA: notes, exit 0 (the CPU path needs neither); --strict: errors, exit 1
    assert toolchain.main([]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("seqpar.toolchain: note") for line in err)
    assert toolchain.main(["--strict"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("seqpar.toolchain: error") and "; fix: " in line for line in err)


def test_cc_that_is_not_an_executable(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    problems = toolchain.check(cuda=False)
    assert any(p.what.startswith("CC=/nonexistent/cc is not an executable") for p in problems)


def test_compiler_and_headers_are_compiled_together(monkeypatch, tmp_path):
    """The probe compiles ``#include <Python.h>``: unusable headers are found, not only missing ones."""
    if toolchain.c_compiler() is None:
        pytest.fail("this machine has no C compiler (gcc is part of its image)")
    assert toolchain.check(cuda=False) == []
    broken = tmp_path / "include"
    broken.mkdir()
    (broken / "Python.h").write_text("#error these headers are broken\n")
    monkeypatch.setattr(toolchain, "python_include_dir", lambda: str(broken))
    (problem,) = toolchain.check(cuda=False)
    assert "cannot compile a file that includes Python.h" in problem.what and "broken" in problem.what


def test_include_dir_is_the_one_triton_passes():
    """The same rule as triton.runtime.build: the default scheme, Debian's posix_local read as posix_prefix."""
    import sysconfig

    scheme = sysconfig.get_default_scheme()
    want = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    assert toolchain.python_include_dir() == want
    import triton.runtime.build as build

    src = pathlib.Path(build.__file__).read_text()   # the rule we mirror is still Triton's
    assert 'os.environ.get("CC")' in src and "posix_local" in src and 'get_paths(scheme=scheme)["include"]' in src
