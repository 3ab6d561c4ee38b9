"""Install layout and the one-way import rule of docs/design.md."""

from __future__ import annotations

import ast
import importlib
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# import name prefix -> source folder (pyproject's package-dir mapping)
MAPPING = {"seqpar.kernels": ROOT / "kernels", "seqpar.models": ROOT / "models", "seqpar": ROOT / "seqpar"}
# docs/design.md: seqpar.kernels -> seqpar.cp -> seqpar.nn -> seqpar.megatron -> seqpar.models -> seqpar.data
#   -> seqpar.train (the loop + the engine interface) -> engines (train's megatron engine, seqpar.deepspeed)
#   -> seqpar.export. A module may import only its own layer or lower ones.
LAYERS = {
    "seqpar.kernels": 0, "seqpar.cp": 1, "seqpar.nn": 2, "seqpar.megatron": 3, "seqpar.models": 4,
    "seqpar.data": 5, "seqpar.train": 6, "seqpar.train.megatron_engine": 7, "seqpar.train.step": 7,
    "seqpar.deepspeed": 7, "seqpar.export": 8, "seqpar.bench": 9,
    "seqpar.quality": 9,  # the quality harness: trains through the engine registry
}
# the modules of each engine (registered by name in seqpar.train.engine.ENGINES): an engine never
# imports another engine, nor the loop or the CLI
ENGINE_MODULES = {"megatron": ("seqpar.train.megatron_engine", "seqpar.train.step"), "deepspeed": ("seqpar.deepspeed",)}
NOT_FOR_ENGINES = ("seqpar.train.loop", "seqpar.train.cli", "seqpar.train.args")
# Only these may call torch.distributed (docs/design.md: comm.py on the attention path; process-group
# set-up lives in train/, megatron/, deepspeed/, and the benchmark harness's own measurement runs).
DIST_ALLOWED = ("seqpar.cp.comm", "seqpar.train", "seqpar.megatron", "seqpar.deepspeed", "seqpar.bench")


def _modules():
    for prefix, folder in MAPPING.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "seqpar" and parts and parts[0] in ("kernels", "models"):
                continue
            yield name, path


def _layer(mod: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _imports(path: pathlib.Path, name: str):
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.module
                for a in node.names:  # `from torch import distributed`
                    yield f"{node.module}.{a.name}"
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                yield "torch.distributed"  # `torch.distributed.x` without an import
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.args[0].value


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"] == {"seqpar": "seqpar", "seqpar.kernels": "kernels", "seqpar.models": "models"}
    found = {n for n, p in _modules() if p.name == "__init__.py"}
    assert found == listed, f"pyproject packages differ from the source tree: missing {found - listed}, stale {listed - found}"


def test_mapped_packages_resolve_to_repo_folders():
    for mod, folder in (("seqpar.kernels", "kernels"), ("seqpar.models", "models")):
        m = importlib.import_module(mod)
        assert pathlib.Path(m.__file__).parent == ROOT / folder


def test_kernels_exports_resolve():
    import seqpar.kernels as K

    for name in K.__all__:
        assert callable(getattr(K, name)), name
    with pytest.raises(AttributeError):
        K.no_such_op  # noqa: B018


@pytest.mark.parametrize("name,path", sorted(_modules()), ids=lambda x: str(x))
def test_imports_flow_one_way(name, path):
    own = _layer(name)
    for imp in _imports(path, name):
        if imp.startswith("torch.distributed"):
            assert name.startswith(DIST_ALLOWED), f"{name} imports {imp}; only {DIST_ALLOWED} may"
        if own is None or not imp.startswith("seqpar."):
            continue
        other = _layer(imp)
        assert other is None or other <= own, f"{name} (layer {own}) imports {imp} (layer {other}): docs/design.md order"


def _within(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _graph(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Static import graph (module level and inside functions) of the modules under ``prefixes``;
    ``from P import m`` is an edge to the module ``P.m`` where that is one, else to ``P``."""
    mods = dict(_modules())
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        if not _within(name, prefixes):
            continue
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for tgt in targets:
                while tgt and tgt not in mods:
                    tgt = tgt.rpartition(".")[0]
                if tgt and tgt != name and _within(tgt, prefixes):
                    out.add(tgt)
        graph[name] = out
    return graph


def test_train_and_engines_have_no_import_circle():
    # issue 23 item 7: loop <-> deepspeed engine through the loop's private helpers, signals <-> cli,
    # checkpoint / memory -> loop were one circle of 8 files
    graph = _graph(("seqpar.train", "seqpar.deepspeed"))
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for nxt in sorted(graph[mod]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(path[path.index(nxt):] + [mod, nxt])
            if nxt not in state:
                visit(nxt, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


def test_engines_import_neither_each_other_nor_the_loop():
    graph = _graph(("seqpar",))
    for engine, prefixes in ENGINE_MODULES.items():
        others = [p for e, ps in ENGINE_MODULES.items() if e != engine for p in ps]
        for mod in (m for m in graph if _within(m, prefixes)):
            for imp in graph[mod]:
                assert not _within(imp, others), f"{mod} ({engine} engine) imports another engine's {imp}"
                assert not _within(imp, NOT_FOR_ENGINES), f"{mod} ({engine} engine) imports {imp}"
    assert "seqpar.train.cli" not in graph["seqpar.train.signals"], "signals must receive what they need"
    # the loop and the CLI reach an engine only through the registry (seqpar.train.engine)
    for mod in ("seqpar.train.loop", "seqpar.train.cli", "seqpar.train.engine"):
        assert not any(_within(imp, [p for ps in ENGINE_MODULES.values() for p in ps]) for imp in graph[mod]), mod


def test_engine_registry_matches_the_recipe_schema():
    import typing

    from seqpar.train.config import TrainConfig
    from seqpar.train.engine import ENGINE_CHECKS, ENGINES, Engine, engine_class

    assert set(typing.get_args(TrainConfig.model_fields["engine"].annotation)) == set(ENGINES)
    for name, target in ENGINES.items():
        assert _within(target.partition(":")[0], ENGINE_MODULES[name]), (name, target)
        cls = engine_class(name)
        assert issubclass(cls, Engine) and cls.name == name and not cls.__abstractmethods__, (name, cls)
    with pytest.raises(ValueError, match="train.engine='torch'"):
        engine_class("torch")
    # --check runs an engine's check without importing the engine: ENGINE_CHECKS names it exactly for the
    # engines that have one (an engine class overriding Engine.check unregistered would go unchecked there)
    assert set(ENGINE_CHECKS) == set(ENGINES)
    for name, target in ENGINE_CHECKS.items():
        overrides = engine_class(name).check.__func__ is not Engine.check.__func__
        assert overrides == (target is not None), (name, target)
        assert target is None or _within(target.partition(":")[0], ENGINE_MODULES[name]), (name, target)


# Modules and commands that never build a megatron object, so must not import megatron-core (~6 s of CPU,
# most of a light command): the recipe schema with everything its validators reach (seqpar.train.config),
# `--check` of a Megatron or DeepSpeed recipe (every launcher's pre-flight: torchrun.sh, deepspeed.sh, and
# slurm.sbatch at every job start and requeue, with `python -m seqpar.train.signals out-dir RECIPE`), the
# CLI modules before they train, preprocessing, the model presets, and the seqpar.megatron package with
# its schema / layout modules (the public names are imported on first use).
LIGHT_MODULES = ("seqpar.train.config", "seqpar.train.signals", "seqpar.train.args", "seqpar.train.cli",
                 "seqpar.train.engine", "seqpar.train.cp_plan", "seqpar.train.memory", "seqpar.data.preprocess",
                 "seqpar.models", "seqpar.megatron", "seqpar.megatron.config", "seqpar.megatron.layout_check",
                 "seqpar.quality.__main__")
_LIGHT_PROBE = """
import contextlib, io, sys
for m in {modules!r}:
    __import__(m)
import seqpar.megatron as sm
from seqpar.train import signals
from seqpar.train.config import load_recipe
# every validator, auto CP schemes priced with the cost balancer's model included
cfg = load_recipe({recipe!r}, ["parallel.cp_schemes=auto", "parallel.cp_balance=cost"])
assert cfg.cp_auto.plan is not None
assert cfg.model.layers and sm.check_pattern("ASLH") == "ASLH" and sm.KIND_OF_LETTER["L"] == "lightning"
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert signals._main(["out-dir", {recipe!r}]) == 0
assert out.getvalue().strip() == cfg.train.out_dir, out.getvalue()
from seqpar.train.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:  # with the held-run and data checks (an empty out_dir)
    assert main([{recipe!r}, "--check", "--set", "train.out_dir=" + {tmp!r}]) == 0
assert "valid for 2 rank(s)" in out.getvalue(), out.getvalue()
with contextlib.redirect_stdout(io.StringIO()) as out:  # DeepSpeed's check: its ds_config, parsed by DeepSpeed
    assert main([{ds_recipe!r}, "--check", "--set", "train.out_dir=" + {tmp!r}]) == 0
assert "deepspeed.runtime.config" in sys.modules, "the DeepSpeed engine's check did not run"
heavy = sorted(m for m in sys.modules if m == "megatron.core" or m.startswith("megatron.core."))
assert not heavy, "megatron-core imported on a light path: " + ", ".join(heavy[:5])
print("ok")
"""


def test_light_paths_do_not_import_megatron_core(tmp_path):
    import subprocess
    import sys

    code = _LIGHT_PROBE.format(modules=LIGHT_MODULES, recipe=str(ROOT / "recipes" / "tiny_hybrid_cp2.yaml"),
                               ds_recipe=str(ROOT / "recipes" / "tiny_hybrid_zero2_cp2.yaml"), tmp=str(tmp_path / "run"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_lazy_public_names_are_the_real_objects():
    # (in this process: megatron-core is imported by the names that need it)
    import seqpar.megatron as sm
    from seqpar.megatron import config as smc
    from seqpar.megatron.attention import SoftmaxCoreAttention
    from seqpar.megatron.specs import layer_pattern, layer_specs
    from seqpar.megatron.transformer_config import SeqparTransformerConfig
    from seqpar.train.checkpoint import checkpoints, held_run
    from seqpar.train import outdir

    assert sm.SeqparTransformerConfig is smc.SeqparTransformerConfig is SeqparTransformerConfig
    assert sm.layer_specs is layer_specs and sm.SoftmaxCoreAttention is SoftmaxCoreAttention
    assert sm.layer_pattern is layer_pattern is smc.layer_pattern and layer_pattern("LLLA", 6) == "LLLALL"
    assert (checkpoints, held_run) == (outdir.checkpoints, outdir.held_run)
    assert set(sm.__all__) <= set(dir(sm)) and all(getattr(sm, n) is not None for n in sm.__all__)
    for mod in (sm, smc):
        with pytest.raises(AttributeError, match="no_such_name"):
            mod.no_such_name  # noqa: B018
