"""Parallel-layout checks as pure functions: run them before any process group starts.

``check_layout`` decides whether a model (heads, layer pattern, sequence length, S2 block size)
can run at a TP x CP x PP split with the chosen CP schemes. It imports nothing distributed, so the
recipe schema (``seqpar.train.config``) calls it while validating a recipe, on every rank, before
``torch.distributed`` is initialised; the attention layers rely on it having passed.

Errors are ``ValueError`` whose message names the field, the value and the fix. Field names are
the recipe's by default (``parallel.tensor_parallel``, ``model.s2_block_size``, ...); pass
``names=MEGATRON_NAMES`` for messages in megatron-core's ``TransformerConfig`` vocabulary.

``cp_scheme_for_layer`` maps megatron-core's per-layer ``cp_comm_type`` to seqpar's scheme names
(``p2p`` -> ring, ``all_gather`` -> allgather, ``a2a`` -> ulysses, ``a2a+p2p`` -> usp).
"""

from __future__ import annotations

from typing import Mapping, Optional

from seqpar.megatron.config import KIND_OF_LETTER

__all__ = ["MEGATRON_CP_COMM", "MEGATRON_NAMES", "RECIPE_NAMES", "ROPE_LETTERS", "TRITON_MAX_HEAD_DIM", "check_layout",
           "check_shapes", "cp_scheme_for_layer"]

#: megatron-core's ``cp_comm_type`` values and the seqpar scheme each one names
MEGATRON_CP_COMM = {"p2p": "ring", "all_gather": "allgather", "a2a": "ulysses", "a2a+p2p": "usp"}

RECIPE_NAMES = {
    "tp": "parallel.tensor_parallel", "cp": "parallel.context_parallel", "pp": "parallel.pipeline_parallel",
    "cp_schemes": "parallel.cp_schemes", "ud": "parallel.usp_ulysses_degree", "seq_len": "data.seq_len",
    "s2_placement": "parallel.s2_head_placement",
    "s2_block_size": "model.s2_block_size",
    "pattern": "model.pattern", "heads": "model.num_attention_heads", "kv_heads": "model.num_kv_heads",
    "num_layers": "model.num_layers", "hidden": "model.hidden_size", "ffn": "model.ffn_hidden_size",
    "vocab": "data.vocab_size", "backend": "parallel.backend",
}
MEGATRON_NAMES = {
    "tp": "tensor_model_parallel_size", "cp": "context_parallel_size", "pp": "pipeline_model_parallel_size",
    "cp_schemes": "cp_schemes", "ud": "usp_ulysses_degree", "seq_len": "seq_length",
    "s2_placement": "s2_head_placement",
    "s2_block_size": "s2_block_size", "pattern": "pattern",
    "heads": "num_attention_heads", "kv_heads": "num_query_groups", "num_layers": "num_layers",
    "hidden": "hidden_size", "ffn": "ffn_hidden_size", "vocab": "vocab_size", "backend": "seqpar_backend",
}

ROPE_LETTERS = "ASH"
"""Layer kinds that apply megatron's rotary embedding to q and k (Lightning layers have no RoPE)."""

TRITON_MAX_HEAD_DIM = 128
"""Largest head dim of the softmax / S2 / MoH Triton kernels: every launch config is compiled and
resource-checked for sm_80 / sm_90 up to 128 (``benchmarks/kernel_resources.py``); beyond it their
backward kernels spill registers (d = 192 / 256: 36-10000 bytes per thread)."""


def cp_scheme_for_layer(kind: str, cp_schemes: Mapping[str, str], cp_comm_type: Optional[str], *,
                        usp_ulysses_degree: int = 1,
                        hierarchical_context_parallel_sizes: Optional[list] = None) -> str:
    """The seqpar CP scheme of a ``kind`` layer. ``cp_schemes[kind]`` decides; megatron-core's
    ``cp_comm_type`` (what ``TransformerLayer`` passes to a layer when CP > 1) is honoured by
    meaning: ``None`` or the name of that same scheme is accepted, anything else is a
    ``ValueError`` (one source of truth for the scheme, nothing silently ignored)."""
    scheme = cp_schemes[kind]
    if cp_comm_type is None:
        return scheme
    if cp_comm_type not in MEGATRON_CP_COMM:
        raise ValueError(f"cp_comm_type={cp_comm_type!r} is not one of megatron-core's {sorted(MEGATRON_CP_COMM)}; "
                         f"seqpar layers take their CP scheme from cp_schemes (leave cp_comm_type=None)")
    mapped = MEGATRON_CP_COMM[cp_comm_type]
    if mapped != scheme:
        raise ValueError(f"cp_comm_type={cp_comm_type!r} (megatron-core's name for seqpar scheme {mapped!r}) "
                         f"disagrees with cp_schemes[{kind!r}]={scheme!r}; seqpar layers read the scheme from "
                         f"cp_schemes: set cp_schemes[{kind!r}]={mapped!r}, or leave cp_comm_type=None")
    if mapped == "usp" and hierarchical_context_parallel_sizes:
        hcp = list(hierarchical_context_parallel_sizes)
        if hcp[0] != usp_ulysses_degree:
            raise ValueError(f"cp_comm_type='a2a+p2p' with hierarchical_context_parallel_sizes={hcp}: the a2a size "
                             f"{hcp[0]} must equal usp_ulysses_degree={usp_ulysses_degree}")
    return mapped


def _heads_fit(what: str, heads: int, kv_heads: int, degree: int, field: str, value: str) -> Optional[str]:
    if heads % degree:
        return f"{what} needs the {heads} query heads per TP rank divisible by {field}={value}"
    if kv_heads % degree and degree % kv_heads:
        return (f"{what} needs the {kv_heads} kv heads per TP rank divisible by {field}={value} (or the reverse, "
                f"kv heads replicated)")
    return None


def check_layout(*, pattern: str, num_layers: int, num_attention_heads: int, num_query_groups: int,
                 tensor_parallel: int = 1, context_parallel: int = 1, pipeline_parallel: int = 1,
                 cp_schemes: Optional[Mapping[str, str]] = None, usp_ulysses_degree: int = 1,
                 seq_len: Optional[int] = None, s2_block_size: int = 16, s2_head_placement: str = "balanced",
                 names: Mapping[str, str] = RECIPE_NAMES) -> None:
    """Raise a ``ValueError`` (all problems, one per line) unless the layout can run.

    Args:
        pattern: layer letters over A/S/L/H, tiled over ``num_layers``.
        num_attention_heads, num_query_groups: the model's query and kv heads.
        tensor_parallel, context_parallel, pipeline_parallel: the split sizes.
        cp_schemes: kind -> scheme (missing kinds: "allgather"); read only when CP > 1.
        usp_ulysses_degree: Ulysses degree of the "usp" scheme.
        seq_len: training sequence length (global, before the CP split); None skips its checks.
        s2_block_size: the S2 block size (accepted for the recipe's call; no CP limit depends on it).
        s2_head_placement: S2 heads per rank under ulysses / usp (a non-default value needs such a layer).
        names: field names for the messages (``RECIPE_NAMES`` or ``MEGATRON_NAMES``).

    Checks: TP divides the query and kv heads; PP divides the layers (MoH runs at any TP: the
    router picks among all heads on every rank); under CP the sequence splits into Megatron's 2 x CP zigzag
    chunks (the trainer's dense zigzag split, ``runtime.local_batch``; ``cp.attention`` itself takes any length,
    and S2 chunks need not be whole blocks), Ulysses / USP degrees divide the heads per TP rank (kv
    heads: or the reverse). (S2 under TP x CP is exact for every stride: each rank passes its
    kv-head offset to ``cp.attention``.)
    """
    n = dict(RECIPE_NAMES, **names)
    tp, cp, pp, ud = tensor_parallel, context_parallel, pipeline_parallel, usp_ulysses_degree
    h, hkv = num_attention_heads, num_query_groups
    bad = sorted(set(pattern) - set(KIND_OF_LETTER)) if isinstance(pattern, str) else None
    if not pattern or bad is None or bad:
        raise ValueError(f"{n['pattern']}={pattern!r} must be a non-empty string over A (softmax), S (s2), "
                         f"L (lightning), H (moh)")
    for key, v in (("tp", tp), ("cp", cp), ("pp", pp), ("ud", ud), ("heads", h), ("kv_heads", hkv),
                   ("num_layers", num_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{n[key]} must be a positive int, got {v!r}")
    errors: list[str] = []
    if h % hkv:
        errors.append(f"{n['kv_heads']}={hkv} must divide {n['heads']}={h} (GQA)")
    if h % tp or hkv % tp:
        errors.append(f"{n['tp']}={tp} must divide the {h} query heads and the {hkv} kv heads; "
                      f"pick a divisor of {_gcd(h, hkv)}")
    if num_layers % pp:
        errors.append(f"{n['pp']}={pp} must divide the {num_layers} layers; use a divisor of {num_layers}")
    letters = (pattern * (num_layers // len(pattern) + 1))[:num_layers]
    kinds = {KIND_OF_LETTER[c] for c in letters}
    schemes = {k: "allgather" for k in KIND_OF_LETTER.values()}
    schemes.update(cp_schemes or {})
    if "usp" in {schemes[k] for k in kinds} and (cp % ud or h % ud):
        errors.append(f"{n['ud']}={ud} must divide {n['cp']}={cp} and the {h} heads (scheme 'usp' in "
                      f"{n['cp_schemes']})")
    if ud != 1 and (cp == 1 or "usp" not in {schemes[k] for k in kinds}):
        # nothing silently ignored: the degree is read by the 'usp' scheme only
        errors.append(f"{n['ud']}={ud} is read only by the 'usp' CP scheme, which no layer runs here ("
                      f"{n['cp']}={cp}, schemes {dict(sorted((k, schemes[k]) for k in kinds))}); set it to 1, or "
                      f"'usp' for a kind in {n['cp_schemes']}")
    s2_heads_sharded = cp > 1 and "s2" in kinds and schemes["s2"] in ("ulysses", "usp")
    if s2_head_placement != "balanced" and not s2_heads_sharded:  # nothing silently ignored
        errors.append(f"{n['s2_placement']}={s2_head_placement!r} is read only by S2 layers under the 'ulysses' / "
                      f"'usp' CP schemes, which no layer runs here ({n['cp']}={cp}, s2 layers: "
                      f"{'s2' in kinds}, scheme {schemes['s2']!r}); leave it at 'balanced'")
    if cp > 1 and not errors:
        h_loc, hkv_loc = h // tp, hkv // tp
        if seq_len is not None and seq_len % (2 * cp):
            errors.append(f"{n['seq_len']}={seq_len} must be a multiple of 2 x {n['cp']} = {2 * cp} "
                          f"(Megatron's zigzag split)")
        for kind in sorted(kinds):
            scheme = schemes[kind]
            field = f"{n['cp_schemes']}.{kind}"
            if scheme == "ulysses":
                msg = _heads_fit(f"{field}='ulysses'", h_loc, hkv_loc, cp, n["cp"], str(cp))
                if msg:
                    errors.append(msg + "; pick another scheme")
            if scheme == "usp":
                msg = _heads_fit(f"{field}='usp'", h_loc, hkv_loc, ud, n["ud"], str(ud))
                if msg:
                    errors.append(msg)
    if errors:
        raise ValueError("\n".join(errors))


def check_shapes(*, pattern: str, num_layers: int, hidden_size: int, num_attention_heads: int,
                 num_query_groups: int, ffn_hidden_size: int, vocab_size: Optional[int] = None,
                 tensor_parallel: int = 1, backend: str = "auto", names: Mapping[str, str] = RECIPE_NAMES) -> None:
    """Raise a ``ValueError`` (all problems, one per line) unless every layer of the model can be
    built and run with these widths: the shape rules of megatron-core's layers and seqpar's kernels.

    Args:
        pattern: layer letters over A/S/L/H, tiled over ``num_layers``.
        hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size: the model's widths
            (head dim = hidden_size / num_attention_heads).
        vocab_size: the embedding rows (None skips its check).
        tensor_parallel: TP size (megatron splits the MLP and the vocabulary over it).
        backend: "auto" / "triton" (the Triton kernels run on GPUs) or "torch".
        names: field names for the messages (``RECIPE_NAMES`` or ``MEGATRON_NAMES``).

    Checks: the heads divide the width; RoPE (A, S, H layers) needs an even head dim; the Triton
    softmax / S2 / MoH kernels take head dims up to ``TRITON_MAX_HEAD_DIM``; TP divides the MLP width
    and the vocabulary (megatron's column-parallel fc1 and vocab-parallel embedding / output layer).
    (TP / GQA divisibility of the heads: ``check_layout``.)
    """
    n = dict(RECIPE_NAMES, **names)
    h, hidden, tp = num_attention_heads, hidden_size, tensor_parallel
    if hidden % h:
        raise ValueError(f"{n['hidden']}={hidden} must be a multiple of {n['heads']}={h}")
    d = hidden // h
    letters = set((pattern * (num_layers // len(pattern) + 1))[:num_layers])
    rope = sorted(letters & set(ROPE_LETTERS))
    head_dim = f"{n['hidden']}={hidden} over {n['heads']}={h} gives head dim {d}"
    errors: list[str] = []
    if rope and d % 2:
        errors.append(f"{head_dim}, but RoPE (megatron's rotary embedding, in the {'/'.join(rope)} layers) needs an "
                      f"even head dim; use a multiple of 2 x {h} = {2 * h} for {n['hidden']} (e.g. "
                      f"{2 * h * max(1, d // 2)} or {2 * h * (d // 2 + 1)})")
    if rope and backend != "torch" and d > TRITON_MAX_HEAD_DIM:
        errors.append(f"{head_dim}, above {TRITON_MAX_HEAD_DIM}, the largest the softmax / S2 / MoH Triton kernels "
                      f"support ({n['backend']}={backend!r} runs them on GPUs); use more heads (>= "
                      f"{-(-hidden // TRITON_MAX_HEAD_DIM)}) or {n['backend']}='torch'")
    if ffn_hidden_size % tp:
        errors.append(f"{n['tp']}={tp} must divide {n['ffn']}={ffn_hidden_size} (megatron splits the MLP over TP); "
                      f"use a multiple of {tp}")
    if vocab_size is not None and vocab_size % tp:
        errors.append(f"{n['tp']}={tp} must divide {n['vocab']}={vocab_size} (megatron's vocab-parallel embedding "
                      f"and output layer); use a multiple of {tp}, e.g. {vocab_size + tp - vocab_size % tp}")
    if errors:
        raise ValueError("\n".join(errors))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
