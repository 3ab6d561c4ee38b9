"""Property-based check of the recipe schema (issue #16): any single bad value in a valid recipe —
wrong type, out of range, non-finite, null where a value belongs, an unknown field — gives exactly
one RecipeError line that names the field, before any process group exists."""

from __future__ import annotations

import math
import pathlib
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types as at
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "recipes" / "tiny_hybrid_cp2.yaml").read_text())


def _leaves() -> list[tuple[tuple[str, str], Any, list, bool]]:
    """(section, field), base annotation, constraint metadata, nullable — every recipe field."""
    from seqpar.train.config import RunConfig

    out = []
    for sec, sinfo in RunConfig.model_fields.items():
        for name, info in sinfo.annotation.model_fields.items():
            ann, meta, nullable = info.annotation, list(info.metadata), False
            if get_origin(ann) is not None and type(None) in get_args(ann):
                nullable = True
                ann = next(a for a in get_args(ann) if a is not type(None))
            while get_origin(ann) is Annotated:
                ann, *extra = get_args(ann)
                meta += [m for e in extra for m in (getattr(e, "metadata", None) or [e])]
            out.append(((sec, name), ann, meta, nullable))
    return out


LEAVES = _leaves()
JUNK = st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(st.text(min_size=1, max_size=3),
                                                                                   st.integers(), min_size=1,
                                                                                   max_size=1))


def _bad_values(ann: Any, meta: list, nullable: bool) -> st.SearchStrategy:
    lo = [(m.ge, False) for m in meta if isinstance(m, at.Ge)] + [(m.gt, True) for m in meta if isinstance(m, at.Gt)]
    hi = [(m.le, False) for m in meta if isinstance(m, at.Le)] + [(m.lt, True) for m in meta if isinstance(m, at.Lt)]
    choices = [JUNK, st.text(max_size=5).filter(lambda s: s not in get_args(ann)) if get_origin(ann) is Literal
               else JUNK]
    if not nullable:
        choices.append(st.none())
    if ann is int:
        choices += [st.booleans(), st.text(max_size=4),
                    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))]
        for b, strict in lo:
            choices.append(st.integers(max_value=b - 1 if not strict else b, min_value=b - 10**6))
    elif ann is float:
        choices += [st.booleans(), st.text(max_size=4), st.sampled_from([math.inf, -math.inf, math.nan])]
        for b, strict in lo:
            choices.append(st.floats(max_value=b, exclude_max=not strict, allow_nan=False, allow_infinity=False,
                                     min_value=-1e6))
        for b, strict in hi:
            choices.append(st.floats(min_value=b, exclude_min=not strict, allow_nan=False, max_value=1e6))
    elif ann is bool:
        choices += [st.integers(), st.text(max_size=5), st.floats(allow_nan=False)]
    elif ann is str:
        choices += [st.integers(), st.booleans(), st.floats(allow_nan=False)]
    elif get_origin(ann) is Literal:  # integers that are not among the allowed values (Literal[0, 1, 2, 3])
        choices += [st.integers().filter(lambda x: x not in get_args(ann)), st.booleans()]
    elif ann is list or get_origin(ann) is list:
        choices += [st.text(max_size=8), st.integers(), st.lists(st.integers(), min_size=1, max_size=1)]
    elif get_origin(ann) is dict:
        choices += [st.sampled_from(["ring", "allgather"]), st.integers(), st.lists(st.text(max_size=3), min_size=1),
                    st.dictionaries(st.sampled_from(["mamba", "rwkv", "ring"]), st.sampled_from(["ring"]),
                                    min_size=1, max_size=1),
                    st.dictionaries(st.sampled_from(["softmax", "moh"]), st.text(max_size=5).filter(
                        lambda s: s not in ("allgather", "ring", "ulysses", "usp")), min_size=1, max_size=1)]
    else:
        raise AssertionError(f"no bad-value strategy for {ann!r}: extend this test with the new field type")
    return st.one_of(*choices)


@st.composite
def bad_recipe(draw) -> tuple[dict, str]:
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    if draw(st.integers(0, 9)) == 0:  # an unknown field (or section)
        sec = draw(st.sampled_from(["model", "parallel", "data", "optim", "train", "trian", "modle"]))
        name = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(
            lambda n: all(n != leaf[0][1] for leaf in LEAVES)))
        tree.setdefault(sec, {})[name] = 1
        return tree, (f"{sec}.{name}" if sec in tree and sec in BASE else sec)
    (sec, name), ann, meta, nullable = draw(st.sampled_from(LEAVES))
    tree.setdefault(sec, {})[name] = draw(_bad_values(ann, meta, nullable))
    return tree, f"{sec}.{name}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_recipe())
def test_any_single_bad_value_is_one_line_naming_the_field(case):
    import torch.distributed as dist

    from seqpar.train.config import RecipeError, from_dict

    tree, field = case
    with pytest.raises(RecipeError) as e:
        from_dict(tree)
    lines = e.value.lines
    ann = {f"{s}.{n}": a for (s, n), a, _, _ in LEAVES}.get(field)  # None: an unknown field or section
    value = tree[field.split(".")[0]][field.split(".", 1)[1]] if ann is not None else None
    # a list field with several bad items gets one line per item (each naming field.index)
    bad_items = sum(not isinstance(x, str) for x in value) if get_origin(ann) is list and isinstance(value, list) else 0
    assert len(lines) == max(1, bad_items), lines
    for line in lines:
        assert line.startswith(field), (field, lines)
        assert "Input should be" not in line and "Traceback" not in line
    assert not dist.is_initialized()


def test_every_field_has_a_description_and_a_strategy():
    from seqpar.train.config import RunConfig

    for (sec, name), ann, meta, nullable in LEAVES:
        info = RunConfig.model_fields[sec].annotation.model_fields[name]
        assert info.description and len(info.description) > 10, f"{sec}.{name} has no docstring"
        _bad_values(ann, meta, nullable)
