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
# docs/design.md: seqpar.kernels -> seqpar.cp -> seqpar.nn -> seqpar.megatron -> seqpar.models
#            -> seqpar.train / deepspeed -> seqpar.export. A module may import only its own layer or lower ones.
# (seqpar.deepspeed's training loop reuses seqpar.train's model/data builders and checkpoint rules, so it
# sits beside seqpar.train.)
LAYERS = {
    "seqpar.kernels": 0, "seqpar.cp": 1, "seqpar.nn": 2, "seqpar.megatron": 3, "seqpar.deepspeed": 5,
    "seqpar.models": 4, "seqpar.train": 5, "seqpar.export": 6, "seqpar.data": 5, "seqpar.bench": 7,
}
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
