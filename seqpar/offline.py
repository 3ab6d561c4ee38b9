"""Offline installs on GPU hosts: a wheelhouse built where a registry is reachable, and a project venv
on the host that keeps the host's own torch / Triton (``make wheelhouse``, ``make install TORCH=system``).

A GPU cluster without internet, or an NGC PyTorch container whose CUDA torch, Transformer Engine and
Apex must not be replaced, already has torch and Triton; seqpar needs the rest (megatron-core,
pydantic, DeepSpeed, ...). Two steps:

1. ``python -m seqpar.offline wheelhouse --dest DIR [--python-version 3.12] [--extras ...]`` (on any
   machine with a registry, from the repo root): the wheels of every dependency of seqpar and the
   chosen extras except torch and Triton, for the target Python and platform, at the versions pinned
   in constraints.txt; DeepSpeed (published as an sdist only) is built here as a pure-Python wheel
   with ``DS_BUILD_OPS=0``, as is any other pure-Python sdist the closure needs. torch and Triton
   enter the resolution as empty placeholder wheels, so neither they nor their CUDA libraries are
   downloaded. ``--skip NAME...``: packages the target already has (also left out, with their own
   dependencies). A manifest (``seqpar-wheelhouse.json``) records what was built for whom.
2. ``python -m seqpar.offline install --venv .venv --wheelhouse DIR`` run by the host's interpreter
   (``PY=/path/to/python make install TORCH=system WHEELHOUSE=DIR``): a venv that sees exactly what
   that interpreter sees (its site-packages, or when it is itself a venv, as on many GPU images, that
   venv's packages too: ``--system-site-packages`` alone would see the base interpreter's only), then
   ``pip install --no-index --find-links DIR -e '.[extras]'`` with pip's configuration (files and
   ``PIP_*`` variables) dropped: the wheelhouse is the only source. Host torch / Triton outside
   pyproject's range are refused first. Every package the interpreter already has is kept when it satisfies seqpar's ranges (its
   constraints.txt pin is dropped); only what is missing or out of range is installed, into the venv
   (pip never uninstalls a package outside the venv). Without ``--wheelhouse`` the same install uses
   the registry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from typing import Iterable, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = "seqpar-wheelhouse.json"
SYSTEM_PACKAGES = ("torch", "triton")  # always the host's own; never in a wheelhouse
STUB_LABEL = "seqparstub"  # local version label of the placeholder wheels
# what an offline GPU host needs: training on both engines and the test suites (export's lm-eval stack is
# optional: add it with --extras train,deepspeed,test,export)
DEFAULT_EXTRAS = ("train", "deepspeed", "test")
# installed next to the project so that its editable build (setuptools>=77) and a venv without pip work
# with --no-index
BOOTSTRAP = ("pip", "setuptools>=77", "wheel")


class OfflineError(RuntimeError):
    """A wheelhouse or install step that cannot succeed, with what to do instead."""


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise OfflineError(f"cannot read a package name from requirement {req!r}")
    return canonical(m.group(1))


# ------------------------------------------------------------------------------------- requirements
def _toml(path: pathlib.Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip's vendored copy of the same parser
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def project_requirements(extras: Iterable[str], pyproject: pathlib.Path = ROOT / "pyproject.toml",
                         drop: Iterable[str] = SYSTEM_PACKAGES) -> list[str]:
    """The requirement strings of seqpar's core dependencies plus ``extras`` (``seqpar[x]`` references
    expanded), without the packages in ``drop``, in pyproject order, each once."""
    project = _toml(pyproject)["project"]
    optional = project.get("optional-dependencies", {})
    name = canonical(project["name"])
    dropped = {canonical(d) for d in drop}
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: Sequence[str]) -> None:
        for r in reqs:
            m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*\[([^\]]*)\]\s*", r)
            if m and canonical(m.group(1)) == name:
                for e in m.group(2).split(","):
                    expand(e.strip())
            elif _req_name(r) not in dropped and r not in out:
                out.append(r)

    def expand(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            raise OfflineError(f"unknown extra {extra!r}: pyproject.toml defines {', '.join(sorted(optional))}")
        seen_extras.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for e in extras:
        expand(e)
    return out


def read_pins(path: pathlib.Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*([^\s;]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def write_constraints(path: pathlib.Path, pins: dict[str, str], drop: Iterable[str] = ()) -> pathlib.Path:
    dropped = {canonical(d) for d in drop}
    path.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n not in dropped))
    return path


# ------------------------------------------------------------------------------------------ wheels
def stub_wheel(directory: pathlib.Path, name: str, version: str) -> pathlib.Path:
    """An empty, dependency-free wheel ``name==version+seqparstub`` (py3-none-any): stands for a package
    the target already has, so a resolution for the target neither downloads it nor its dependencies."""
    dist = re.sub(r"[-_.]+", "_", name)
    ver = f"{version}+{STUB_LABEL}"
    info = f"{dist}-{ver}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: seqpar.offline\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for fname, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{fname},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"{dist}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for fname, text in files.items():
            z.writestr(fname, text)
    return path


def target_flags(python_version: Optional[str], platforms: Sequence[str]) -> list[str]:
    """pip's cross-target flags for CPython ``python_version`` (e.g. '3.12') on ``platforms``; [] for
    the running interpreter and platform."""
    if not python_version:
        if platforms:
            raise OfflineError("--platform needs --python-version (the target's CPython, e.g. 3.12)")
        return []
    if not re.fullmatch(r"3\.\d+", python_version):
        raise OfflineError(f"--python-version: got {python_version!r}; expected major.minor, e.g. 3.12")
    nodot = python_version.replace(".", "")
    flags = ["--python-version", python_version, "--implementation", "cp",
             "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none"]
    for p in platforms or manylinux_platforms():
        flags += ["--platform", p]
    return flags


def manylinux_platforms(glibc: str = "2.28", arch: str = "x86_64") -> list[str]:
    """pip platform tags a manylinux host with ``glibc`` accepts, most specific first (pip matches
    each tag exactly, so every older manylinux_2_N is listed, plus the legacy aliases)."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise OfflineError(f"--glibc: got {glibc!r}; expected 2.N with N >= 17")
    tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"] + ([f"manylinux2010_{arch}", f"manylinux1_{arch}"]
                                               if arch in ("x86_64", "i686") else [])


def _pip(python: str, *args: str, env: Optional[dict] = None, check: bool = True,
         capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, text=True, capture_output=capture)
    if capture:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise OfflineError(f"pip {args[0]} failed (exit {proc.returncode}); see the output above")
    return proc


def _is_pure(wheel: pathlib.Path) -> bool:
    tags = wheel.name[:-4].split("-")[-3:]
    return tags[1] == "none" and tags[2] == "any"


def build_pure_wheel(spec: str, dest: pathlib.Path, python: str = sys.executable) -> pathlib.Path:
    """Build ``spec`` (an sdist) into a pure-Python wheel in ``dest`` (no dependencies built). DeepSpeed is
    built with ``DS_BUILD_OPS=0``: its CUDA ops then JIT-compile on the GPU host when first used."""
    before = set(dest.glob("*.whl"))
    env = dict(os.environ, DS_BUILD_OPS="0")
    _pip(python, "wheel", "--no-deps", "--no-binary", _req_name(spec), "-w", str(dest), spec, env=env)
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob(f"{re.sub('[-.]', '_', _req_name(spec))}-*.whl"))
    if not new:
        raise OfflineError(f"pip wheel {spec} produced no wheel")
    if not _is_pure(new[0]):
        raise OfflineError(f"{spec} builds a platform wheel ({new[0].name}): build it on a machine of the target "
                           f"platform and Python, then put it in the wheelhouse")
    return new[0]


_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)")


def build_wheelhouse(dest: pathlib.Path, *, extras: Sequence[str] = DEFAULT_EXTRAS,
                     python_version: Optional[str] = None, platforms: Sequence[str] = (),
                     constraints: pathlib.Path = ROOT / "constraints.txt", skip: Sequence[str] = (),
                     pure_sdists: Sequence[str] = ("deepspeed",), python: str = sys.executable) -> dict:
    """Download (and for pure-Python sdists, build) the wheels of seqpar's dependencies for ``extras``
    into ``dest`` for the target Python / platform (:func:`target_flags`), at the ``constraints`` pins;
    torch, Triton and ``skip`` stand in as placeholders and are left out. Returns the manifest (also
    written to ``dest/seqpar-wheelhouse.json``)."""
    pins = read_pins(constraints)
    skipped = sorted({canonical(s) for s in (*SYSTEM_PACKAGES, *skip)})
    for name in skipped:
        if name not in pins:
            raise OfflineError(f"--skip {name}: constraints.txt pins no version of it, so no placeholder can stand "
                               f"for it; add `{name}==<the target's version>` there or drop it from --skip")
    dest.mkdir(parents=True, exist_ok=True)
    _clear_previous(dest)
    reqs = project_requirements(extras, drop=SYSTEM_PACKAGES) + list(BOOTSTRAP)
    flags = target_flags(python_version, platforms)
    with tempfile.TemporaryDirectory(prefix="seqpar_wheelhouse_") as tmp:
        tmp = pathlib.Path(tmp)
        stubs, built = tmp / "stubs", tmp / "built"
        stubs.mkdir()
        built.mkdir()
        for name in skipped:
            stub_wheel(stubs, name, pins[name])
        cons = write_constraints(tmp / "constraints.txt", pins, drop=skipped)
        with cons.open("a") as f:
            f.writelines(f"{n}=={pins[n]}+{STUB_LABEL}\n" for n in skipped)
        wanted = {canonical(p) for p in pure_sdists}
        for name in sorted(wanted):
            build_pure_wheel(f"{name}=={pins[name]}" if name in pins else name, built, python)
        for attempt in range(8):  # each round builds one more pure-Python sdist the closure needs
            proc = _pip(python, "download", "--only-binary=:all:", "--dest", str(dest), *flags,
                        "--find-links", str(stubs), "--find-links", str(built), "-c", str(cons), *reqs,
                        check=False, capture=True)
            if proc.returncode == 0:
                break
            m = _NO_MATCH.search(proc.stderr)
            if not m or canonical(m.group(1)) in wanted:
                raise OfflineError("pip download failed; see the output above")
            name = canonical(m.group(1))
            wanted.add(name)
            build_pure_wheel(f"{name}=={pins[name]}" if name in pins else name, built, python)
        else:
            raise OfflineError("pip download still fails after building 8 pure-Python sdists; see the output above")
    for w in dest.glob(f"*+{STUB_LABEL}-*.whl"):  # pip download copies the placeholders too
        w.unlink()
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    manifest = {
        "python_version": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platforms": list(platforms or (manylinux_platforms() if python_version else [sysconfig.get_platform()])),
        "extras": list(extras), "left_out": skipped, "requirements": reqs, "wheels": wheels,
        "bytes": sum((dest / w).stat().st_size for w in wheels),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wheelhouse {dest}: {len(wheels)} wheels, {manifest['bytes'] / 2**20:.1f} MiB, for CPython "
          f"{manifest['python_version']} ({', '.join(manifest['platforms'][:2])}...), extras {','.join(extras)}; "
          f"left out (the target's own): {', '.join(skipped)}")
    return manifest


def _clear_previous(dest: pathlib.Path) -> None:
    """Remove the wheels a previous build listed (two versions of one package would make the offline
    resolution ambiguous); refuse a folder with other wheels in it."""
    manifest = dest / MANIFEST
    old = json.loads(manifest.read_text())["wheels"] if manifest.exists() else []
    for w in old:
        (dest / w).unlink(missing_ok=True)
    foreign = sorted(p.name for p in dest.glob("*.whl"))
    if foreign:
        raise OfflineError(f"{dest} holds wheels no seqpar wheelhouse build listed ({', '.join(foreign[:3])}...): "
                           f"use an empty folder")


# ------------------------------------------------------------------------------------------ install
def interpreter_view(python: str) -> dict:
    """What ``python`` sees: version, whether it is a venv, its non-stdlib ``sys.path`` entries (site
    folders and what their .pth files add; PYTHONPATH, user site and the working directory excluded)
    and the versions of its installed distributions."""
    code = r"""
import json, sys, sysconfig, importlib.metadata as md
std = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
paths = [p for p in sys.path if p and not p.endswith(".zip") and p not in std and not p.endswith("lib-dynload")]
dists = {}
for d in md.distributions(path=paths):
    n = d.metadata["Name"]
    if n and n not in dists:
        dists[n] = d.version
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "executable": sys.executable,
                  "venv": sys.prefix != sys.base_prefix, "prefix": sys.prefix, "paths": paths, "dists": dists}))
"""
    proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OfflineError(f"cannot run {python}: {proc.stderr.strip() or proc.returncode}")
    view = json.loads(proc.stdout)
    view["dists"] = {canonical(k): v for k, v in view["dists"].items()}
    return view


def site_packages(venv: pathlib.Path) -> pathlib.Path:
    found = sorted(venv.glob("lib/python3*/site-packages")) or sorted(venv.glob("Lib/site-packages"))
    if not found:
        raise OfflineError(f"{venv} has no site-packages folder")
    return found[0]


def install_system(venv: pathlib.Path, *, wheelhouse: Optional[pathlib.Path], extras: Optional[Sequence[str]] = None,
                   constraints: pathlib.Path = ROOT / "constraints.txt", python: str = sys.executable,
                   root: pathlib.Path = ROOT) -> dict:
    """Create ``venv`` over ``python``'s packages (its torch / Triton kept) and install seqpar editable
    with ``extras`` (default: the wheelhouse's) from ``wheelhouse`` with ``--no-index`` (pip's configuration
    dropped, :func:`pip_env`), or from the registry when ``wheelhouse`` is None.
    Returns the venv's torch / Triton versions and where its torch lives."""
    view = interpreter_view(python)
    if "torch" not in view["dists"]:
        raise OfflineError(f"TORCH=system: {python} has no torch (it sees {', '.join(view['paths']) or 'no site folder'}); "
                           f"point PY at the interpreter that holds the GPU build of torch")
    manifest = None
    if wheelhouse is not None:
        mpath = wheelhouse / MANIFEST
        if not mpath.exists():
            raise OfflineError(f"WHEELHOUSE={wheelhouse}: no {MANIFEST} there; build it with `make wheelhouse "
                               f"PYVER={view['version']} WHEELHOUSE=...` on a machine with a registry")
        manifest = json.loads(mpath.read_text())
        if manifest["python_version"] != view["version"]:
            raise OfflineError(f"WHEELHOUSE={wheelhouse} was built for Python {manifest['python_version']}, but "
                               f"{python} is Python {view['version']}: rebuild it with PYVER={view['version']}")
    extras = list(extras or (manifest["extras"] if manifest else DEFAULT_EXTRAS))
    bad = out_of_range(view["dists"], root / "pyproject.toml")
    if bad:
        raise OfflineError(f"{python} has {'; '.join(bad)}: seqpar supports that range only (pyproject.toml; "
                           f"README: Installing on a GPU cluster); use an interpreter whose torch / Triton are in it")
    vpy = overlay_venv(python, venv, view)
    cons = write_constraints(venv / "seqpar-constraints.txt", read_pins(constraints),
                             drop=[*SYSTEM_PACKAGES, *view["dists"]])   # what python has is kept as it is
    env = pip_env(wheelhouse)
    index = [] if wheelhouse is None else ["--no-index", "--find-links", str(wheelhouse)]
    if subprocess.run([vpy, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        _bootstrap_pip(vpy, wheelhouse, env)
    spec = f"{root}[{','.join(extras)}]"
    _pip(vpy, "install", *index, "-c", str(cons), "-e", spec, env=env)
    check = subprocess.run([vpy, "-c", "import json, torch, triton, seqpar; print(json.dumps({'torch': torch.__version__, "
                            "'torch_file': torch.__file__, 'triton': triton.__version__, 'seqpar': seqpar.__file__}))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise OfflineError(f"the new venv cannot import torch / triton / seqpar:\n{check.stderr}")
    got = json.loads(check.stdout)
    if pathlib.Path(got["torch_file"]).resolve().is_relative_to(venv.resolve()):
        raise OfflineError(f"torch was installed into {venv} instead of {python}'s being used")
    (venv / "seqpar-install.mk").write_text(
        f"# written by `make install TORCH=system`: later make targets reuse these\nTORCH := system\n"
        f"PY := {python}\nWHEELHOUSE := {wheelhouse or ''}\n")
    print(f"{venv}: seqpar ({','.join(extras)}) over {python} (Python {view['version']}); torch {got['torch']} and "
          f"triton {got['triton']} are {python}'s ({got['torch_file']}); {len(view['dists'])} of its packages kept "
          f"as they are")
    return got


def pip_env(wheelhouse: Optional[pathlib.Path]) -> dict:
    """The environment of the install's pip. With a wheelhouse, pip's configuration is dropped: no
    configuration file (``PIP_CONFIG_FILE=/dev/null``) and no inherited ``PIP_*`` variable (a
    ``PIP_FIND_LINKS`` or ``PIP_INDEX_URL`` in the environment would otherwise feed the resolution even
    with ``--no-index``), so the wheelhouse is the only source. Without one (the registry), the user's
    configuration is kept."""
    if wheelhouse is None:
        return dict(os.environ, PIP_NO_INPUT="1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse))
    return env


def overlay_venv(python: str, venv: pathlib.Path, view: Optional[dict] = None, with_pip: bool = True) -> str:
    """Create (or reuse) ``venv`` that sees what ``python`` sees: a venv of ``python``'s base interpreter
    whose ``zz_seqpar_system_site.pth`` appends ``python``'s site folders after the venv's own (so the venv's
    packages win, then ``python``'s in its own order). Works when ``python`` is itself a venv, where
    ``--system-site-packages`` would only reach the base interpreter's packages. Returns the venv's python."""
    view = view or interpreter_view(python)
    marker = venv / ".seqpar-torch-system"
    if venv.exists() and not marker.exists():
        raise OfflineError(f"{venv} exists and was not made by `make install TORCH=system`: remove it first "
                           f"(`make clean`), so that no registry torch shadows {python}'s")
    if not (venv / "bin" / "python").exists():
        _make_venv(python, venv, with_pip)
    marker.write_text(view["executable"] + "\n")
    pth = site_packages(venv) / "zz_seqpar_system_site.pth"
    pth.write_text("".join(p + "\n" for p in view["paths"]))
    return str(venv / "bin" / "python")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def out_of_range(dists: dict[str, str], pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """``'torch 2.9.1 (seqpar: torch>=2.11,<2.14)'`` for each of torch / Triton in ``dists`` outside the
    ``>=`` / ``<`` bounds of pyproject's dependencies (local labels such as +cu130 ignored)."""
    bad = []
    for req in _toml(pyproject)["project"]["dependencies"]:
        name = _req_name(req)
        if name not in SYSTEM_PACKAGES or name not in dists:
            continue
        have = _release(dists[name])
        for op, ver in re.findall(r"(>=|<)\s*([0-9][0-9.]*)", req):
            want = _release(ver)
            if (op == ">=" and have < want) or (op == "<" and have >= want):
                bad.append(f"{name} {dists[name]} (seqpar: {req.replace(' ', '')})")
                break
    return bad


def _make_venv(python: str, venv: pathlib.Path, with_pip: bool = True) -> None:
    """``python -m venv`` (a venv's interpreter makes one over its base interpreter); without pip where
    ensurepip is missing (Debian's python3 without python3-venv)."""
    proc = subprocess.run([python, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(venv)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        proc2 = subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
        if proc2.returncode != 0:
            raise OfflineError(f"{python} -m venv failed:\n{proc.stderr}{proc2.stderr}")


def _bootstrap_pip(vpy: str, wheelhouse: Optional[pathlib.Path], env: dict) -> None:
    """pip for a venv made ``--without-pip``: run from the wheelhouse's pip wheel (a wheel is importable)."""
    wheels = sorted(wheelhouse.glob("pip-*.whl")) if wheelhouse else []
    if not wheels:
        raise OfflineError(f"{vpy} has no pip and the wheelhouse no pip wheel: install python3-venv (Debian/Ubuntu) "
                           f"or rebuild the wheelhouse")
    cmd = [vpy, f"{wheels[-1]}/pip", "install", "--no-index", "--find-links", str(wheelhouse), "pip"]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise OfflineError("installing pip from the wheelhouse failed; see the output above")


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.offline", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheelhouse", help="download / build the wheels of every non-torch dependency")
    w.add_argument("--dest", required=True, type=pathlib.Path)
    w.add_argument("--python-version", default=None, help="target CPython, e.g. 3.12 (default: this interpreter)")
    w.add_argument("--platform", action="append", default=[], help="pip platform tag (repeatable; default with "
                   "--python-version: manylinux_2_{17..GLIBC} for --arch)")
    w.add_argument("--glibc", default="2.28", help="newest glibc of the target (default 2.28)")
    w.add_argument("--arch", default="x86_64")
    w.add_argument("--extras", default=",".join(DEFAULT_EXTRAS))
    w.add_argument("--skip", default="", help="comma-separated packages the target already has")
    w.add_argument("--constraints", type=pathlib.Path, default=ROOT / "constraints.txt")
    i = sub.add_parser("install", help="a venv over this interpreter's torch, the rest from a wheelhouse")
    i.add_argument("--venv", required=True, type=pathlib.Path)
    i.add_argument("--wheelhouse", type=pathlib.Path, default=None, help="default: the registry")
    i.add_argument("--extras", default="", help="default: the wheelhouse's")
    i.add_argument("--constraints", type=pathlib.Path, default=ROOT / "constraints.txt")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "wheelhouse":
            platforms = args.platform or (manylinux_platforms(args.glibc, args.arch) if args.python_version else [])
            build_wheelhouse(args.dest.resolve(), extras=[e for e in args.extras.split(",") if e],
                             python_version=args.python_version, platforms=platforms, constraints=args.constraints,
                             skip=[s for s in args.skip.split(",") if s])
        else:
            wh = args.wheelhouse.resolve() if args.wheelhouse else None
            install_system(args.venv.resolve(), wheelhouse=wh, extras=[e for e in args.extras.split(",") if e],
                           constraints=args.constraints)
    except OfflineError as e:
        print(f"seqpar.offline: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
