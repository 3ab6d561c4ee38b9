"""The attention fields of the run schema, defined once, and ``SeqparTransformerConfig``.

Every seqpar attention knob is a field of one strict pydantic v2 model here:

- ``AttentionModelFields`` — ``s2_*`` and ``moh_*`` (the recipe's ``model`` section inherits them);
- ``AttentionParallelFields`` — ``cp_schemes``, ``usp_ulysses_degree``, ``backend`` (the recipe's
  ``parallel`` section inherits them).

``SeqparTransformerConfig`` is megatron-core's ``TransformerConfig`` dataclass plus dataclass fields
generated from those two models (``backend`` is called ``seqpar_backend`` there, next to Megatron's
own fields), validated by the same models, so a field, its default, its type and its range exist
once. ``Strict`` and ``format_errors`` are the shared base and error formatter of the schema: one
line per bad value naming the field, the value and what is allowed. ``check_pattern`` /
``layer_pattern``: the layer pattern's letters (``KIND_OF_LETTER``) and its tiling over the layers.

This module does not import megatron-core (~6 s of CPU): the recipe schema, ``--check``, the Slurm
helpers and the CLIs import it. ``SeqparTransformerConfig`` lives in
``seqpar.megatron.transformer_config`` and is imported from there on first use of the name here.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Iterable, Literal, Optional, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from seqpar.cp import SUPPORTED
from seqpar.kernels import S2Layout

KIND_OF_LETTER = {"A": "softmax", "S": "s2", "L": "lightning", "H": "moh"}
DEFAULT_SCHEMES = {"softmax": "allgather", "s2": "allgather", "lightning": "allgather", "moh": "allgather"}

Kind = Literal["softmax", "s2", "lightning", "moh"]
Scheme = Literal["allgather", "ring", "ulysses", "usp"]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Strict(BaseModel):
    """Base of every schema section: strict types (no ``"3"`` -> 3, no ``true`` -> 1, no 2.5 -> 2;
    an int is accepted for a float), unknown fields rejected, assignments validated, the attribute
    docstring below each field is its description."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, validate_default=True,
                              use_attribute_docstrings=True)


class AttentionModelFields(Strict):
    """S2 layout, the softmax window and MoH routing knobs (recipe section ``model``)."""

    s2_block_size: PositiveInt = 16
    """S2 block size in tokens (DKernel's block_size)."""
    s2_local_blocks: PositiveInt = 2
    """S2 local window in blocks."""
    s2_vert_stride: PositiveInt = 4
    """S2 vertical stride in blocks (each kv head reads every vert_stride-th block column)."""
    softmax_window: Optional[PositiveInt] = None
    """Sliding window of the softmax (``A``) layers, Mistral-style: token i attends to tokens j of its document
    with i - softmax_window < j <= i; null = full causal. Under CP every scheme takes it (the ring and allgather
    move only the window's halo); key blocks outside the window are skipped, not masked. Export: a pure-softmax
    model becomes MistralForCausalLM, any other SeqparForCausalLM with softmax_window."""
    moh_num_shared_heads: NonNegativeInt = 1
    """MoH heads every token uses (always on)."""
    moh_top_k: PositiveInt = 1
    """MoH routed heads per token."""
    moh_aux_loss_coef: NonNegativeFloat = 0.01
    """MoH load-balance loss coefficient beta: the loss gets beta x the average of L_b over the model's MoH layers
    (as MoH's own training; paper 0.01), through MoEAuxLossAutoScaler (docs/moh.md)."""

    @field_validator("s2_block_size")
    @classmethod
    def _s2_tile(cls, v: int) -> int:
        # the S2 kernels' own rule (S2Layout: the block is the Triton tile), checked where the value is set
        try:
            S2Layout(block_size=v)
        except ValueError as e:
            raise ValueError(str(e).replace("S2Layout.block_size ", "", 1) + "; e.g. 16, 32, 64 or 128") from None
        return v


class AttentionParallelFields(Strict):
    """CP scheme and kernel backend knobs (recipe section ``parallel``)."""

    cp_schemes: dict[Kind, Scheme] = Field(default_factory=lambda: dict(DEFAULT_SCHEMES))
    """CP scheme per attention kind, e.g. ``{softmax: ring, lightning: allgather}``: kinds softmax / s2 /
    lightning / moh, schemes allgather / ring / ulysses / usp (seqpar.cp.SUPPORTED); kinds left out use
    allgather. Used when the CP size is > 1."""
    usp_ulysses_degree: PositiveInt = 1
    """Ulysses degree of the "usp" scheme (divides the CP size and the heads; ring over CP / degree groups)."""
    s2_head_placement: Literal["balanced", "contiguous"] = "balanced"
    """Which kv heads each rank computes for S2 layers under the "ulysses" / "usp" schemes: "balanced" (kv heads of
    complementary stride residues per rank, equal S2 blocks, used when it strictly lowers the busiest rank's blocks;
    the same bytes) or "contiguous" (rank u holds kv heads u x H_kv / degree ..). docs/cp.md, S2 head placement."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Kernel backend for every seqpar op: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"."""

    @field_validator("cp_schemes")
    @classmethod
    def _fill_and_check_schemes(cls, v: dict[str, str]) -> dict[str, str]:
        v = {**DEFAULT_SCHEMES, **v}
        for kind, scheme in v.items():
            if (kind, scheme) not in SUPPORTED:
                ok = sorted(s for k, s in SUPPORTED if k == kind)
                raise ValueError(f"{kind}={scheme!r} is not a supported scheme for {kind}; use one of {ok}")
        return v


def s2_layout(fields: Any, heads: Optional[int] = None) -> S2Layout:
    """The model's S2 layout from its ``s2_block_size`` / ``s2_local_blocks`` / ``s2_vert_stride``
    (a recipe's ``model`` section or a ``SeqparTransformerConfig``), resolved against ``heads`` query
    heads when given (DKernel's rotation step; what the S2 layers compute with)."""
    layout = S2Layout(block_size=fields.s2_block_size, local_blocks=fields.s2_local_blocks,
                      vert_stride=fields.s2_vert_stride)
    return layout if heads is None else layout.with_heads(heads)


def check_moh_heads(num_shared: int, top_k: int, heads: int, prefix: str = "") -> None:
    """MoH needs at least one routed head and ``shared + top_k <= heads`` (the one place of this rule)."""
    if num_shared >= heads:
        raise ValueError(f"{prefix}moh_num_shared_heads={num_shared} must be < the {heads} attention heads "
                         f"(at least one head is routed)")
    if num_shared + top_k > heads:
        raise ValueError(f"{prefix}moh_num_shared_heads + {prefix}moh_top_k = {num_shared} + {top_k} must be <= "
                         f"the {heads} attention heads; lower {prefix}moh_top_k")


def check_usp_degree(degree: int, cp: int, heads: int, prefix: str = "") -> None:
    """The "usp" scheme's Ulysses degree divides the CP size and the heads."""
    if cp % degree or heads % degree:
        raise ValueError(f"{prefix}usp_ulysses_degree={degree} must divide the CP size {cp} and the {heads} heads")


# ---------------------------------------------------------------------------------------------------
# one line per error

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _kind_of(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(v), type(v).__name__)


def describe(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """What a field accepts, in words: ``an integer >= 1``, ``one of 'fp32', 'bf16'``, ..."""
    metadata = list(metadata)
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for e in extra:
            metadata.extend(getattr(e, "metadata", []) or [e])
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return describe(inner[0], metadata) + " or null"
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return f"a mapping from ({describe(args[0])}) to ({describe(args[1])})" if args else "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a mapping with fields {sorted(annotation.model_fields)}"
    words = _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    finite = False
    for m in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            val = getattr(m, attr, None)
            if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) and val is not None:
                words += f" {op} {val}"
        if getattr(m, "allow_inf_nan", None) is False:
            finite = True
    if finite and annotation is float:
        words = words.replace("a number", "a finite number", 1)
    return words


def _field_at(root: type[BaseModel], loc: tuple) -> tuple[Optional[type[BaseModel]], Any, list]:
    """(innermost model, annotation, constraint metadata) of the value at ``loc`` inside ``root``;
    annotation None when ``loc`` leaves the schema."""
    model: Optional[type[BaseModel]] = root
    ann: Any = root
    meta: list = []
    for part in loc:
        while get_origin(ann) is Annotated:
            ann, *extra = get_args(ann)
            meta = [m for e in extra for m in (getattr(e, "metadata", None) or [e])]
        origin, args = get_origin(ann), get_args(ann)
        if origin is not None and type(None) in args:
            ann = next(a for a in args if a is not type(None))
            origin, args = get_origin(ann), get_args(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            if part not in ann.model_fields:
                return model, None, []
            info = ann.model_fields[part]
            ann, meta = info.annotation, list(info.metadata)
        elif origin is list and isinstance(part, int):
            ann, meta = args[0], []
        elif origin is dict:
            ann, meta = args[1], []
        else:
            return model, None, []
    return model, ann, meta


def _dotted(loc: tuple, rename: dict[str, str], python: bool) -> str:
    if not python:
        return ".".join(str(p) for p in loc)
    # keyword-argument style for Python callers: cp_schemes['s2'], text_files[0]
    head, *rest = loc or ("",)
    return rename.get(str(head), str(head)) + "".join(f"[{p!r}]" for p in rest)


def format_errors(err: ValidationError, root: type[BaseModel], prefix: str = "",
                  rename: Optional[dict[str, str]] = None, python: bool = False) -> list[str]:
    """One line per error of ``err`` (raised validating ``root``): ``<field>: got <value> (<type>);
    expected <what>`` or the validator's own sentence. ``prefix`` goes before every field name;
    ``python`` names fields as keyword arguments (``cp_schemes['s2']``, ``rename``d) instead of
    recipe paths (``parallel.cp_schemes.s2``)."""
    lines = []
    rename = rename or {}
    seen = set()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "[key]")
        if loc in seen:  # a bad key and its bad value are one bad entry
            continue
        seen.add(loc)
        name = prefix + _dotted(loc, rename, python)
        value = e.get("input")
        kind = e["type"]
        parent, ann, meta = _field_at(root, loc)
        if kind == "value_error":
            msg = str(e["ctx"]["error"]) if "ctx" in e else e["msg"].removeprefix("Value error, ")
            lines.append(msg if not loc or name in msg else f"{name}: {msg}")
        elif kind == "extra_forbidden":
            fields = sorted(parent.model_fields) if parent is not None else []
            where = prefix + _dotted(loc[:-1], rename, python) if loc[:-1] else prefix.rstrip(".")
            lines.append(f"{name}: unknown field; fields of {where or 'a recipe'}: {fields}")
        elif "[key]" in e["loc"]:
            lines.append(f"{name}: unknown key {value!r}; {e['msg'].replace('Input should be', 'use')}")
        else:
            expected = describe(ann, meta) if ann is not None else e["msg"]
            got = "null" if value is None else f"{_show(value)} ({_kind_of(value)})"
            lines.append(f"{name}: got {got}; expected {expected}")
    return lines


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "", **kw: Any) -> BaseModel:
    """``model.model_validate(data)`` with a ValueError of one line per bad value (``format_errors``)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError("\n".join(format_errors(e, model, prefix, **kw))) from None


def check_pattern(pattern: str, name: str = "pattern") -> str:
    """Validate a pattern string; returns it. ValueError names ``name`` and the allowed letters."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{name} must be a non-empty string over {sorted(KIND_OF_LETTER)}, got {pattern!r}")
    bad = sorted(set(pattern) - set(KIND_OF_LETTER))
    if bad:
        raise ValueError(f"{name}={pattern!r} has unknown kind letter(s) {bad}; use A (softmax), S (s2), "
                         f"L (lightning), H (moh)")
    return pattern


def layer_pattern(pattern: str, num_layers: int) -> str:
    """The pattern tiled to ``num_layers`` letters."""
    check_pattern(pattern)
    return (pattern * (num_layers // len(pattern) + 1))[:num_layers]


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> description (the attribute docstring), e.g. for ``--help``-style listings."""
    return {n: (f.description or "").strip() for n, f in model.model_fields.items()}


def __getattr__(name: str) -> Any:
    # megatron-core is imported where a megatron config is really built, not by the recipe schema
    if name == "SeqparTransformerConfig":
        from seqpar.megatron.transformer_config import SeqparTransformerConfig

        return SeqparTransformerConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["s2_layout", "AttentionModelFields", "AttentionParallelFields", "DEFAULT_SCHEMES", "KIND_OF_LETTER", "Kind", "Scheme",
           "SeqparTransformerConfig", "Strict", "check_moh_heads", "check_pattern", "check_usp_degree", "describe", "field_docs",
           "format_errors", "layer_pattern", "validate"]
