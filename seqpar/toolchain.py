"""What Triton needs on a GPU host besides Python packages: a C compiler, ``Python.h`` and ``libcuda``.

Triton compiles a small C launcher stub the first time it launches a kernel on a GPU
(``triton/runtime/build.py``): it runs ``$CC``, else ``gcc``, else ``clang`` on a C file that includes
``Python.h`` from the interpreter's include directory, and links ``libcuda.so.1``. On a host without
them the first kernel launch fails deep inside Triton (``Failed to find C compiler``, ``Python.h: No
such file or directory``, ``libcuda.so cannot found``). ``make test-gpu``, ``make bench`` and ``make
gpu-check`` run ``python -m seqpar.toolchain`` first, which says what is missing, one line each, with
the fix. The CPU path (torch backends, the Triton interpreter) needs none of this: without CUDA the
same lines are printed as notes and the exit status is 0 (``--strict`` makes them errors anyway).

    python -m seqpar.toolchain            # exit 1 on a CUDA machine that lacks something
    python -m seqpar.toolchain --strict   # exit 1 wherever something is missing
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Problem:
    """One missing piece: ``what`` is missing, ``fix`` says how to provide it."""

    what: str
    fix: str

    def line(self) -> str:
        return f"{self.what}; fix: {self.fix}"


def c_compiler() -> Optional[str]:
    """The C compiler Triton's launcher build uses (same rule: ``$CC``, else ``gcc``, else ``clang``),
    as given (``$CC`` may be a bare name or a path); None when neither is on PATH and CC is unset."""
    cc = os.environ.get("CC")
    if cc is not None:
        return cc
    return shutil.which("gcc") or shutil.which("clang")


def python_include_dir() -> str:
    """The directory Triton's launcher build passes as ``-I`` for ``Python.h`` (same rule as
    ``triton.runtime.build``: the default sysconfig scheme, Debian's ``posix_local`` read as
    ``posix_prefix``). In a venv this is the base interpreter's include directory."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def _dev_package_hint() -> str:
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"install the headers of Python {v}: `apt-get install python{v}-dev` (Debian/Ubuntu), "
            f"`dnf install python{v}-devel` (RHEL/Fedora), or use an interpreter that ships them (conda, pyenv, "
            f"python.org builds)")


def check(cuda: Optional[bool] = None) -> list[Problem]:
    """Everything Triton's launcher build would miss on this host, as :class:`Problem` s (empty: all
    there). ``cuda``: also check ``libcuda.so.1`` the way Triton finds it (default: when torch sees
    a GPU). Compiles a one-line C file that includes ``Python.h`` (syntax only, well under a second),
    so a broken compiler or unusable headers are found too, not only missing files."""
    problems: list[Problem] = []
    cc = c_compiler()
    cc_path = None if cc is None else (shutil.which(cc) or (cc if os.access(cc, os.X_OK) else None))
    if cc is None:
        problems.append(Problem(
            "no C compiler: Triton builds its CUDA launcher with $CC, gcc or clang at the first kernel launch, "
            "and none is on PATH",
            "`apt-get install gcc` (Debian/Ubuntu) or `dnf install gcc` (RHEL/Fedora), or export CC=/path/to/cc"))
    elif cc_path is None:
        problems.append(Problem(f"CC={cc} is not an executable (Triton compiles its CUDA launcher with $CC)",
                                "export CC=/path/to/gcc (or clang), or unset CC to use gcc / clang from PATH"))
    inc = python_include_dir()
    header = os.path.join(inc, "Python.h")
    if not os.path.isfile(header):
        problems.append(Problem(
            f"Python.h not found in {inc} (Triton's CUDA launcher includes the headers of {sys.executable})",
            _dev_package_hint()))
    if cc_path is not None and os.path.isfile(header):
        err = _compile_probe(cc_path, inc)
        if err:
            problems.append(Problem(f"{cc_path} cannot compile a file that includes Python.h: {err}",
                                    f"repair the compiler or the headers in {inc} ({_dev_package_hint()})"))
    if cuda is None:
        cuda = _cuda_available()
    if cuda:
        err = _libcuda_problem()
        if err:
            problems.append(Problem(f"libcuda.so.1 not found as Triton looks for it ({err})",
                                    "run `ldconfig` as root so `ldconfig -p` lists libcuda.so.1, or export "
                                    "TRITON_LIBCUDA_PATH=<directory holding libcuda.so.1>"))
    return problems


def _compile_probe(cc: str, include_dir: str) -> str:
    """'' when ``cc`` compiles ``#include <Python.h>``, else the compiler's first error line."""
    with tempfile.TemporaryDirectory(prefix="seqpar_cc_") as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint seqpar_probe(void) { return Py_IsInitialized(); }\n")
        try:
            proc = subprocess.run([cc, "-fsyntax-only", f"-I{include_dir}", src], capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
    if proc.returncode == 0:
        return ""
    lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if "error" in ln.lower()]
    return (lines or (proc.stderr or proc.stdout or f"exit status {proc.returncode}").splitlines() or [""])[0].strip()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _libcuda_problem() -> str:
    try:
        from triton.backends.nvidia.driver import libcuda_dirs
    except Exception as e:  # noqa: BLE001 - a Triton without the NVIDIA backend: say so
        return f"triton.backends.nvidia.driver is not importable: {type(e).__name__}: {e}"
    try:
        libcuda_dirs()
    except Exception as e:  # noqa: BLE001 - Triton asserts with its own message
        return " ".join(str(e).split()) or type(e).__name__
    return ""


def report() -> dict:
    """The toolchain as found (compiler, its version line, include directory, problems): for summaries."""
    cc = c_compiler()
    version = ""
    if cc is not None and shutil.which(cc):
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
            version = (version.splitlines() or [""])[0]
        except (OSError, subprocess.TimeoutExpired):
            version = ""
    return {"cc": cc, "cc_version": version, "python_include": python_include_dir(),
            "problems": [p.line() for p in check()]}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.toolchain", description=__doc__.splitlines()[0])
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when something is missing even if torch sees no GPU (default: only on CUDA)")
    args = ap.parse_args(argv)
    cuda = _cuda_available()
    problems = check(cuda)
    fatal = bool(problems) and (cuda or args.strict)
    for p in problems:
        prefix = "error" if fatal else "note (needed only to launch Triton kernels on a GPU)"
        print(f"seqpar.toolchain: {prefix}: {p.line()}", file=sys.stderr)
    if fatal:
        return 1
    if not problems:
        print(f"seqpar.toolchain: ok (C compiler {c_compiler()}, Python.h in {python_include_dir()}"
              f"{', libcuda.so.1 found' if cuda else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
