"""The run recipe: one strict pydantic v2 schema with a docstring per field, loaded from YAML with
``--set section.field=value`` overrides.

Sections: ``model`` (``ModelConfig``), ``parallel`` (``ParallelConfig``), ``data`` (``DataConfig``),
``optim`` (``OptimConfig``), ``train`` (``TrainConfig``), together ``RunConfig``. The attention knobs
(``model.s2_*``, ``model.moh_*``, ``parallel.cp_schemes`` / ``usp_ulysses_degree`` / ``backend``)
are inherited from ``seqpar.megatron.config`` — the same fields megatron-core's
``SeqparTransformerConfig`` carries — so each is defined once.

Strict means: ``2.5`` is not an integer, ``true`` is not a number, ``"ring"`` is not a list or a
mapping, ``null`` is not a value unless the field says so, unknown sections / fields are errors.
Every bad value becomes one line ``<section.field>: got <value> (<type>); expected <what>`` in a
``RecipeError`` (a ValueError), raised before any process group starts. The YAML loader reads
``1e6`` as a number (YAML 1.2; YAML 1.1 would make it a string), rejects duplicate keys, and turns
syntax errors and empty files into one line naming the file and line.

``RunConfig.check_world(world_size)`` adds the checks that need the launcher's world (TP x CP x DP).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from seqpar.cp.auto import INFINIBAND_GBYTES_PER_S, NVLINK_GBYTES_PER_S
from seqpar.megatron.config import (DEFAULT_SCHEMES, AttentionModelFields, AttentionParallelFields, FiniteFloat, Kind,
                                    NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Scheme, Strict,
                                    check_moh_heads, check_pattern, format_errors, layer_pattern)
from seqpar.megatron.layout_check import check_layout, check_shapes
from seqpar.models import SIZES, VARIANTS, ModelPreset, preset


class RecipeError(ValueError):
    """A bad recipe; ``str()`` is one line per problem, each naming the field and what is allowed."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


SELECTIVE_RECOMPUTE_LETTERS = "AS"
"""Kinds whose core attention is a pure function of (q, k, v), so megatron's selective recompute can
rerun it: softmax and S2 (Lightning is a whole self-attention module; MoH's gates are set per forward)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------------
# paths named by a recipe


@dataclass(frozen=True)
class RecipePath:
    """Marks a recipe field that names paths on disk (``Annotated[str, RecipePath("file")]``, or on a
    ``list[str]`` field: every entry); ``RunConfig.check_paths`` checks every marked field before any
    process starts (``--check``, the launchers' pre-flight, ``seqpar-train`` before its process group).
    An empty string means "not set" and is not checked.

    kind: ``"file"`` (read by the run: an existing, readable regular file), ``"dir"`` (written by the
    run: an existing writable folder, or a path whose nearest existing parent is one, so it can be
    created), ``"prefix"`` (read: ``path + suffix`` is a readable file for every ``suffixes`` entry,
    e.g. a megatron indexed dataset's ``.bin`` / ``.idx``).
    """

    kind: Literal["file", "dir", "prefix"]
    suffixes: tuple[str, ...] = ()
    nonempty: bool = False
    """Files only: an empty file is an error too (e.g. a text file of the corpus)."""

    def problem(self, field: str, value: str) -> Optional[str]:
        """One line naming ``field``, the path and the fix, or None when ``value`` is fine."""
        if not value:
            return None
        if self.kind == "prefix":
            return next((p for p in (_file_problem(field, value + sfx, value, self.nonempty)
                                     for sfx in self.suffixes) if p), None)
        if self.kind == "file":
            return _file_problem(field, value, value, self.nonempty)
        path = pathlib.Path(value)
        if path.exists():
            if not path.is_dir():
                return f"{field}={value!r} is not a folder (the run writes into it); give a folder path"
            return None if os.access(path, os.W_OK | os.X_OK) else \
                f"{field}={value!r} is not writable by this user; give a folder you can write to"
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return (f"{field}={value!r} cannot be created: {str(parent)!r} is not a writable folder; give a path "
                    f"under a folder you can write to")
        return None


def _file_problem(field: str, path: str, value: str, nonempty: bool) -> Optional[str]:
    p = pathlib.Path(path)
    where = f"{field}={value!r}" + ("" if path == value else f" ({path})")
    if not p.exists():
        cwd = "" if p.is_absolute() else f" (relative to the current folder {os.getcwd()})"
        return f"{where}: no such file{cwd}; fix the path or remove the entry"
    if not p.is_file():
        return f"{where} is not a regular file; give a file path"
    if not os.access(p, os.R_OK):
        return f"{where} is not readable by this user; fix its permissions"
    if nonempty and p.stat().st_size == 0:
        return f"{where} is empty; give a file with text or remove the entry"
    return None


class ModelConfig(AttentionModelFields):
    """Model preset, optional shape overrides, and the attention-kind knobs."""

    preset: str = "tiny-hybrid"
    """Model preset "<size>[-<variant>]": sizes tiny / 125m / 1b / 7b, variants dense / lightning / s2 / moh / hybrid."""
    pattern: Optional[str] = None
    """Layer pattern overriding the preset's: letters A (softmax), S (s2), L (lightning), H (moh), tiled over the layers."""
    num_layers: Optional[PositiveInt] = None
    """Transformer layers (null = the preset's)."""
    hidden_size: Optional[PositiveInt] = None
    """Model width (null = the preset's); a multiple of num_attention_heads."""
    num_attention_heads: Optional[PositiveInt] = None
    """Query heads (null = the preset's)."""
    num_kv_heads: Optional[PositiveInt] = None
    """Key/value heads, GQA (null = the preset's); divides num_attention_heads."""
    ffn_hidden_size: Optional[PositiveInt] = None
    """MLP width (null = the preset's)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter/compute dtype: "fp32", or "bf16" (bf16 model, fp32 master weights in the optimizer)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: "none"; "selective" (megatron's core-attention recompute: the attention of
    A and S layers runs again in backward); "full" (every layer's forward runs again in backward,
    megatron recompute_method="uniform", one layer per checkpoint)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        size, _, variant = v.partition("-")
        _need(size in SIZES and (not variant or variant in VARIANTS),
              f"unknown preset {v!r}; use <size>[-<variant>] with sizes {sorted(SIZES)} and variants {sorted(VARIANTS)}")
        return v

    @field_validator("pattern")
    @classmethod
    def _known_letters(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_pattern(v, "model.pattern")

    @model_validator(mode="after")
    def _shape(self) -> "ModelConfig":
        if self.recompute == "selective":
            bad = sorted(set(self.layer_pattern) - set(SELECTIVE_RECOMPUTE_LETTERS))
            _need(not bad, f"model.recompute='selective' recomputes the core attention of A/S layers only, but the "
                           f"pattern {self.layer_pattern!r} has {bad} layers; use model.recompute='full'")
        s = self.shape
        _need(s.num_attention_heads % s.num_query_groups == 0,
              f"model.num_kv_heads={s.num_query_groups} must divide model.num_attention_heads={s.num_attention_heads}")
        # the widths (head dim, RoPE, kernel head dims, TP splits): check_shapes, with the other sections
        _need(self.softmax_window is None or "A" in self.layer_pattern,
              f"model.softmax_window={self.softmax_window} applies to softmax (A) layers, but the pattern "
              f"{self.layer_pattern!r} has none; remove it or add A layers")
        if "H" in self.layer_pattern:
            check_moh_heads(self.moh_num_shared_heads, self.moh_top_k, s.num_attention_heads, prefix="model.")
        return self

    @property
    def shape(self) -> ModelPreset:
        """The preset with this section's shape overrides and pattern applied."""
        p = preset(self.preset)
        kw = {k: v for k, v in {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                                "num_attention_heads": self.num_attention_heads,
                                "num_query_groups": self.num_kv_heads, "ffn_hidden_size": self.ffn_hidden_size,
                                "pattern": self.pattern}.items() if v is not None}
        return p.__class__(**{**p.__dict__, **kw})

    @property
    def layer_pattern(self) -> str:
        return self.shape.pattern

    @property
    def layers(self) -> str:
        """One letter per layer of the whole model: the pattern tiled over ``num_layers``."""
        s = self.shape
        return layer_pattern(s.pattern, s.num_layers)

    @property
    def layer_kinds(self) -> dict[str, int]:
        """``{attention kind: layers}`` of the whole model (every pipeline stage), in first-use order."""
        from seqpar.megatron.config import KIND_OF_LETTER

        counts: dict[str, int] = {}
        for c in self.layers:
            counts[KIND_OF_LETTER[c]] = counts.get(KIND_OF_LETTER[c], 0) + 1
        return counts

    @property
    def moh_active(self) -> float:
        """MoH's share of (token, head) pairs computed: ``(shared + top_k) / heads``."""
        return (self.moh_num_shared_heads + self.moh_top_k) / self.shape.num_attention_heads


class ParallelConfig(AttentionParallelFields):
    """TP / CP sizes, the CP scheme per attention kind and the topology the automatic schemes assume."""

    cp_schemes: dict[Kind, Scheme] = Field(default_factory=lambda: dict(DEFAULT_SCHEMES))
    """CP scheme per attention kind, e.g. ``{softmax: ring, lightning: allgather}``: kinds softmax / s2 /
    lightning / moh, schemes allgather / ring / ulysses / usp (seqpar.cp.SUPPORTED); kinds left out use
    allgather. Or "auto": per kind of the model the scheme (and one usp_ulysses_degree) with the least
    predicted time for this model, data.seq_len, CP size and topology (gpus_per_node, *_gbytes_per_s;
    seqpar.cp.choose_schemes), resolved when the recipe is loaded (--check prints it, --dry-run the
    predicted bytes and time). Used when the CP size is > 1."""
    gpus_per_node: PositiveInt = 8
    """GPUs per node (ranks are placed TP fastest, then CP): a CP group, USP's Ulysses or ring group
    inside one node talks at intra_node_gbytes_per_s, else at inter_node_gbytes_per_s."""
    intra_node_gbytes_per_s: PositiveFloat = NVLINK_GBYTES_PER_S
    """Bandwidth between two GPUs of a node, GB/s per direction (default: NVLink 4 of H100/H200 SXM, 900 GB/s
    bidirectional; PCIe Gen5 x16 is about 64). Read by cp_schemes: auto and --dry-run's CP prediction."""
    inter_node_gbytes_per_s: PositiveFloat = INFINIBAND_GBYTES_PER_S
    """Bandwidth between nodes per GPU, GB/s per direction (default: one 400 Gb/s InfiniBand NDR NIC per GPU,
    50 GB/s; 200 Gb/s HDR: 25). Read by cp_schemes: auto and --dry-run's CP prediction."""
    cp_auto_overlap: bool = False
    """cp_schemes: auto ranks the schemes by their predicted time with the ring's transfers hidden behind its
    compute (true) or by the time without overlap (false: the conservative bound; NCCL's send/recv shares
    the SMs with attention, so at long sequences the overlapped model would always pick the ring)."""

    @field_validator("cp_schemes", mode="wrap")
    @classmethod
    def _auto_or_schemes(cls, v: Any, handler: Any) -> Any:
        if v == "auto":  # resolved by RunConfig (seqpar.train.cp_plan.resolve_auto) before anything reads it
            return v
        if isinstance(v, str):
            raise ValueError(f"got {v!r} (string); expected 'auto' or a mapping kind -> scheme, e.g. {{softmax: ring}}")
        return handler(v)

    tensor_parallel: PositiveInt = 1
    """TP size; DP = world / (TP x CP x PP)."""
    context_parallel: PositiveInt = 1
    """CP size: every sequence (every packed document) is split over the CP ranks by parallel.cp_balance."""
    cp_balance: Literal["zigzag", "cost"] = "zigzag"
    """How each step's tokens are placed on the CP ranks: "zigzag" (Megatron's: every document cut in
    2 x CP chunks, rank r holds chunks r and 2 x CP - 1 - r; balances causal softmax inside each
    document) or "cost" (the joint balancer, seqpar.cp.CostModel: chunks of the step's documents placed
    so that the whole model's modelled attention work - softmax, S2 blocks, Lightning, MoH heads - is
    equal per rank). Both are exact; tensorboard cp/modelled_imbalance shows the balance reached. Used
    when the CP size is > 1."""
    pipeline_parallel: PositiveInt = 1
    """PP size: the layers are split evenly over this many stages (megatron's 1F1B schedule; divides
    model.num_layers)."""
    overlap_grad_reduce: bool = True
    """megatron-core DDP: start each gradient bucket's DP x CP all-reduce (reduce-scatter with the
    distributed optimizer) during backward, as soon as the bucket's gradients are ready."""
    distributed_timeout_s: PositiveFloat = 300.0
    """Timeout (seconds) of every process group (torch's default group, megatron's groups, seqpar.cp's
    subgroups): a collective that waits longer on a dead or hung rank raises on the surviving ranks,
    which then exit non-zero naming the failed rank / host (seqpar.train.signals)."""


class DataConfig(Strict):
    """Dataset, tokenizer, sequence length, batch."""

    dataset: Literal["text", "mqar", "indexed", "hf"] = "text"
    """"indexed" (megatron .bin/.idx prefixes from python -m seqpar.data.preprocess, in data.blend),
    "hf" (local JSON Lines / parquet data.files read by Hugging Face datasets, tokenized once into the
    cache), "text" (local text files or the Python standard library, one document per file, packed in
    memory: the demo) or "mqar" (synthetic recall)."""
    tokenizer: str = "train"
    """A sentencepiece .model file, a Hugging Face tokenizer folder (tokenizer.json), or "train"
    (a sentencepiece BPE model of data.vocab_size pieces trained on the text data: the demo; text
    only). Its files are stored in every checkpoint; --resume with other files is refused."""
    seq_len: Annotated[int, Field(ge=2)] = 128
    """Tokens per sequence; a multiple of 2 x CP (the trainer's zigzag split; S2 chunks need not be whole blocks)."""
    global_batch: PositiveInt = 8
    """Sequences per step over all DP ranks; a multiple of the DP size."""
    vocab_size: Annotated[int, Field(ge=64)] = 512
    """The model's vocabulary (embedding rows): >= the tokenizer's ids; with data.tokenizer "train"
    also the trained tokenizer's size (>= 512); MQAR's vocabulary (>= 64)."""
    blend: list = Field(default_factory=list)
    """indexed: Megatron's --data-path form, [PREFIX] or [WEIGHT, PREFIX, WEIGHT, PREFIX, ...]
    (weights > 0, relative), each PREFIX naming PREFIX.bin / PREFIX.idx; split by data.split."""
    split: Optional[str] = None
    """Train / valid / test shares of each blend prefix's documents, e.g. "969,30,1" (null: "969,30,1"
    with data.blend); 0 = no such split. Not with per-split blends."""
    train_blend: list = Field(default_factory=list)
    """indexed, instead of data.blend + data.split: the training blend (same form as data.blend)."""
    valid_blend: list = Field(default_factory=list)
    """indexed, with data.train_blend: the validation blend (empty: no validation split)."""
    test_blend: list = Field(default_factory=list)
    """indexed, with data.train_blend: the test blend (empty: no test split)."""
    files: list[str] = Field(default_factory=list)
    """hf: local .jsonl / .json / .parquet files, one source (split by data.split)."""
    json_key: str = "text"
    """hf: the field (column) that holds each document's text."""
    text_files: Annotated[list[str], RecipePath("file", nonempty=True)] = Field(default_factory=list)
    """text: local text files for the tokenizer and the corpus (a list, e.g. [a.txt]); empty = the Python
    standard library sources."""
    max_bytes: PositiveInt = 1_000_000
    """text: characters of text read (tokenizer training and corpus)."""
    cache_dir: Annotated[str, RecipePath("dir")] = ""
    """Trained tokenizers, dataset index caches and hf conversions (built once, shared by the ranks);
    empty = $SEQPAR_CACHE or ~/.cache/seqpar."""
    mqar_pairs: PositiveInt = 8
    """MQAR key-value pairs per sequence."""
    mqar_queries: PositiveInt = 8
    """MQAR queries per sequence."""
    document_mask: bool = True
    """Documents packed into one sequence never attend to each other (every attention kind; RoPE and
    Lightning's state restart per document; megatron PackedSeqParams / THD, per-document zigzag under
    CP). false: every sequence is one document, attention crosses the EOD tokens (the pre-masking
    behaviour). MQAR rows are single documents either way."""
    micro_batch: NonNegativeInt = 0
    """Sequences per micro-batch on one DP rank (0 = the whole DP share, one micro-batch); a step runs
    global_batch / (DP x micro_batch) micro-batches through megatron's schedule (gradient accumulation;
    under PP the micro-batches fill the pipeline)."""

    @field_validator("blend", "train_blend", "valid_blend", "test_blend")
    @classmethod
    def _blend_form(cls, v: list, info: ValidationInfo) -> list:
        if v:
            from seqpar.data.inputs import parse_blend

            parse_blend(v, f"data.{info.field_name}")
        return v

    @field_validator("split")
    @classmethod
    def _split_form(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from seqpar.data.inputs import parse_split

            parse_split(v)
        return v

    @model_validator(mode="after")
    def _sources(self, info: ValidationInfo) -> "DataConfig":
        kind = self.dataset
        per_split = self.train_blend or self.valid_blend or self.test_blend
        unused = [f for f, on in (("blend", kind != "indexed" and self.blend),
                                  ("train_blend", kind != "indexed" and per_split),
                                  ("split", kind not in ("indexed", "hf") and self.split is not None),
                                  ("files", kind != "hf" and self.files),
                                  ("json_key", kind != "hf" and self.json_key != "text"),
                                  ("text_files", kind != "text" and self.text_files),
                                  ("tokenizer", kind == "mqar" and self.tokenizer != "train")) if on]
        _need(not unused, f"data.{unused[0] if unused else ''} is not used by data.dataset={kind!r}; remove it "
                          f"(or pick the dataset that reads it)")
        if kind == "indexed":
            _need(bool(self.blend) != bool(per_split),
                  "data.dataset='indexed' needs data.blend ([PREFIX] or [WEIGHT, PREFIX, ...]) or per-split blends "
                  "(data.train_blend + data.valid_blend / test_blend), not both" if per_split else
                  "data.dataset='indexed' needs data.blend: [PREFIX] or [WEIGHT, PREFIX, WEIGHT, PREFIX, ...] "
                  "(make PREFIX.bin / .idx with python -m seqpar.data.preprocess)")
            _need(not per_split or (self.train_blend and self.split is None),
                  "data.train_blend is required with per-split blends, and data.split does not apply to them "
                  "(each split has its own blend)")
        if kind == "hf":
            _need(bool(self.files), "data.dataset='hf' needs data.files: local .jsonl / .json / .parquet files")
            _need(bool(self.json_key), "data.json_key is empty; give the field that holds each document's text")
        if kind in ("indexed", "hf"):
            _need(self.tokenizer != "train",
                  f"data.tokenizer='train' trains on the text dataset only; data.dataset={kind!r} needs the "
                  f"tokenizer the data is (to be) tokenized with: a sentencepiece .model file or a Hugging Face "
                  f"tokenizer folder")
        # the tokenizer's byte fallback alone takes 256 pieces
        _need(kind != "text" or self.tokenizer != "train" or self.vocab_size >= 512,
              f"data.vocab_size={self.vocab_size} must be >= 512 for a trained tokenizer (data.tokenizer='train')")
        # MQAR keys are distinct tokens of [4, vocab_size / 2) (seqpar.data.MQARDataset)
        _need(kind != "mqar" or self.vocab_size // 2 - 4 >= self.mqar_pairs,
              f"data.mqar_pairs={self.mqar_pairs} needs as many distinct keys, but data.vocab_size={self.vocab_size} "
              f"has {self.vocab_size // 2 - 4} (token ids 4 .. vocab_size / 2 - 1); raise data.vocab_size to >= "
              f"{2 * (self.mqar_pairs + 4)} or lower data.mqar_pairs")
        if info.context and info.context.get("check_files"):
            from seqpar.data.inputs import check_inputs

            check_inputs(self)  # the files exist and fit: before any process group, on every rank
        return self


class OptimConfig(Strict):
    """AdamW and the warmup + cosine schedule."""

    lr: PositiveFloat = 3e-3
    """Peak learning rate (AdamW), a finite number > 0."""
    min_lr: NonNegativeFloat = 3e-4
    """Learning rate at the end of the cosine decay, in [0, lr]."""
    weight_decay: NonNegativeFloat = 0.1
    """AdamW weight decay."""
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """AdamW beta1, in [0, 1)."""
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    """AdamW beta2, in [0, 1)."""
    warmup_steps: NonNegativeInt = 10
    """Linear warmup steps."""
    grad_clip: NonNegativeFloat = 1.0
    """Global gradient-norm clip (0 = off)."""
    distributed: Optional[bool] = None
    """megatron-core distributed optimizer (fp32 main weights and Adam moments sharded over DP x CP);
    null = on when DP x CP > 1. A checkpoint resumes only with the value it was written with."""

    @model_validator(mode="after")
    def _min_lr(self) -> "OptimConfig":
        _need(self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        return self


class TrainConfig(Strict):
    """Steps, seed, outputs, checkpoints and fault handling."""

    steps: PositiveInt = 100
    """Optimizer steps (the length of the LR schedule)."""
    seed: NonNegativeInt = 1234
    """Seed of the model initialisation and the data order."""
    out_dir: Annotated[str, RecipePath("dir")] = "runs/demo"
    """Run directory: tensorboard events in <out_dir>/tb, checkpoints in <out_dir>/checkpoints."""
    save_every: NonNegativeInt = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: NonNegativeInt = 0
    """Keep only the newest N checkpoints, deleting older ones after each save (0 = keep all)."""
    overwrite: bool = False
    """Allow a run without --resume into an out_dir that already holds checkpoints or tensorboard events:
    they are deleted first. False: such a run stops with an error (use --resume, another out_dir, or this)."""
    on_corrupt_checkpoint: Literal["fallback", "stop"] = "fallback"
    """--resume when the newest checkpoint fails its manifest check (changed, truncated or missing file):
    "fallback" warns naming both and loads the newest intact checkpoint; "stop" raises."""
    skip_nonfinite_steps: NonNegativeInt = 0
    """Steps with a non-finite loss or grad norm that are skipped (no update) before the run stops;
    0 = stop at the first one. Never counts towards a checkpoint of non-finite weights."""
    debug_nonfinite: bool = False
    """Per-layer forward hooks that name the first layer / attention kind whose output went non-finite
    (one isfinite per layer output per step; off by default)."""
    log_every: PositiveInt = 1
    """Tensorboard/progress update interval (steps)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    eval_interval: NonNegativeInt = 0
    """Validation every this many optimizer steps and after the last one (train.steps), on the
    validation split (data.split / data.valid_blend; MQAR: another seed); 0 = none. valid/loss and
    valid/ppl go to tensorboard, the progress line and the summary."""
    eval_iters: PositiveInt = 1
    """Batches of data.global_batch sequences per validation: the first eval_iters batches of the split
    every time (the same numbers on every rank and layout; a short split is cycled)."""
    time_attention: bool = False
    """Log forward time per attention kind to tensorboard (attention_fwd_ms/<kind>); synchronises on CUDA."""
    peak_tflops: Optional[PositiveFloat] = None
    """Peak TFLOP/s of one GPU for perf/mfu (null = the dense peak of a known device in the model's math mode — bf16,
    or TF32 / plain fp32 for an fp32 model: H100, H200, A100, L40S, A40, RTX 4090; on a CPU or another GPU MFU is then not reported). TFLOP/s, not FLOP/s."""

    @field_validator("peak_tflops")
    @classmethod
    def _peak_in_tflops(cls, v: Optional[float]) -> Optional[float]:
        _need(v is None or (math.isfinite(v) and v < 1e5),
              f"train.peak_tflops={v} is not a device's peak in TFLOP/s (an H100 is 989.4); give TFLOP/s "
              f"(e.g. 312 for an A100), or null for the device table")
        return v
    # --- h13-deepspeed ---
    engine: Literal["megatron", "deepspeed"] = "megatron"
    """Training engine: "megatron" (megatron-core DDP / distributed optimizer) or "deepspeed" (the DeepSpeed
    engine with ZeRO 0-3, settings in the deepspeed section)."""
    # --- end h13-deepspeed ---


class DeepSpeedConfig(Strict):
    """DeepSpeed engine settings (used when train.engine is "deepspeed"; see seqpar.deepspeed.config)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded over DP x CP), 2 (+ gradients),
    3 (+ parameters)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO optimizer-state offload to host memory: "none" or "cpu" (zero_stage >= 1)."""
    config: Annotated[str, RecipePath("file")] = ""
    """Path of a user ds_config JSON merged into the one built from the recipe ("" = none); a key set in
    both places with different values is an error naming both."""

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _no_bool_stage(cls, v: Any) -> Any:
        # Literal[0, 1, 2, 3] compares by ==, so False / True would pass as stage 0 / 1
        if isinstance(v, bool):
            raise ValueError(f"must be one of 0, 1, 2, 3 (an integer), got {v!r}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "DeepSpeedConfig":
        _need(self.offload_optimizer == "none" or self.zero_stage >= 1,
              f"deepspeed.offload_optimizer='cpu' needs deepspeed.zero_stage >= 1, got {self.zero_stage}")
        problem = RecipePath("file").problem("deepspeed.config", self.config)
        _need(problem is None, f"{problem} (a ds_config JSON), or leave it empty")
        return self


SECTIONS = ("model", "parallel", "data", "optim", "train", "deepspeed")


_VALID_FIX = {
    "text": "use data.dataset='indexed' or 'hf' with a data.split that gives valid a share (e.g. \"969,30,1\"), "
            "or set train.eval_interval=0",
    "indexed": "give valid a share in data.split (e.g. \"969,30,1\") or a data.valid_blend, or set "
               "train.eval_interval=0",
    "hf": "give valid a share in data.split (e.g. \"969,30,1\"), or set train.eval_interval=0",
    "mqar": "",
}


def _has_valid_split(d: DataConfig) -> bool:
    """Whether the recipe's data has a validation split (before any file is read)."""
    from seqpar.data.inputs import DEFAULT_SPLIT, parse_split

    if d.dataset == "mqar":
        return True  # the same task from another seed
    if d.dataset == "text":
        return False
    if d.dataset == "indexed" and (d.train_blend or d.valid_blend):
        return bool(d.valid_blend)
    return parse_split(d.split or DEFAULT_SPLIT)[1] > 0


class RunConfig(Strict):
    """A whole recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model preset, shape overrides and attention-kind knobs."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """TP / CP sizes and CP schemes."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Dataset, sequence length, batch."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Steps, seed, outputs, checkpoints, fault handling."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings (train.engine: deepspeed)."""

    _cp_auto: Any = PrivateAttr(default=None)  # seqpar.train.cp_plan.AutoChoice when cp_schemes was "auto"

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        p = self.model.shape
        tp, cp = self.parallel.tensor_parallel, self.parallel.context_parallel
        if self.parallel.cp_schemes == "auto":  # the one place "auto" becomes schemes, before any check reads them
            self._cp_auto = _resolve_cp_auto(self)
        # every parallel-layout rule lives in one pure function (seqpar.megatron.layout_check)
        check_layout(pattern=self.model.layer_pattern, num_layers=p.num_layers,
                     num_attention_heads=p.num_attention_heads, num_query_groups=p.num_query_groups,
                     tensor_parallel=tp, context_parallel=cp,
                     pipeline_parallel=self.parallel.pipeline_parallel,
                     cp_schemes=self.parallel.cp_schemes, usp_ulysses_degree=self.parallel.usp_ulysses_degree,
                     seq_len=self.data.seq_len, s2_block_size=self.model.s2_block_size,
                     s2_head_placement=self.parallel.s2_head_placement)
        # every width rule of megatron's layers and seqpar's kernels (head dim parity for RoPE, kernel head
        # dims, TP splits of the MLP and the vocabulary)
        check_shapes(pattern=self.model.layer_pattern, num_layers=p.num_layers, hidden_size=p.hidden_size,
                     num_attention_heads=p.num_attention_heads, num_query_groups=p.num_query_groups,
                     ffn_hidden_size=p.ffn_hidden_size, vocab_size=self.data.vocab_size, tensor_parallel=tp,
                     backend=self.parallel.backend)
        if self.train.eval_interval:
            _need(_has_valid_split(self.data),
                  f"train.eval_interval={self.train.eval_interval} needs a validation split, and "
                  f"data.dataset={self.data.dataset!r} has none here: " + _VALID_FIX[self.data.dataset])
        if self.data.dataset == "mqar":
            _need(self.data.seq_len >= 2 * (self.data.mqar_pairs + self.data.mqar_queries),
                  f"data.seq_len={self.data.seq_len} must be >= 2 x (data.mqar_pairs + data.mqar_queries) = "
                  f"{2 * (self.data.mqar_pairs + self.data.mqar_queries)}")
        return self

    @property
    def cp_auto(self) -> Any:
        """What ``parallel.cp_schemes: auto`` resolved to (``seqpar.train.cp_plan.AutoChoice``), or None
        when the recipe gave the schemes."""
        return self._cp_auto

    def check_world(self, world_size: int) -> int:
        """Validate against the launcher's world; returns the DP size."""
        par = self.parallel
        mp = par.tensor_parallel * par.context_parallel * par.pipeline_parallel
        _need(world_size % mp == 0, f"the world size {world_size} is not divisible by parallel.tensor_parallel x "
                                    f"parallel.context_parallel x parallel.pipeline_parallel = {mp}; change them "
                                    f"or the number of processes")
        dp = world_size // mp
        _need(self.data.global_batch % dp == 0,
              f"data.global_batch={self.data.global_batch} must be a multiple of the DP size {dp}")
        share, mb = self.data.global_batch // dp, self.data.micro_batch
        _need(mb == 0 or share % mb == 0,
              f"data.micro_batch={mb} must divide the sequences per DP rank, data.global_batch / DP = "
              f"{self.data.global_batch} / {dp} = {share}; use a divisor of {share} (or 0)")
        return dp

    def check_paths(self) -> None:
        """Every path the recipe names (fields marked ``RecipePath``) exists / can be written, checked
        here before any process starts; raises RecipeError with one line per bad path."""
        problems = []
        for sec in SECTIONS:
            section = getattr(self, sec)
            for name, info in type(section).model_fields.items():
                for mark in (m for m in info.metadata if isinstance(m, RecipePath)):
                    value = getattr(section, name)
                    for i, v in enumerate(value if isinstance(value, list) else [value]):
                        field = f"{sec}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                        problems.append(mark.problem(field, v))
        problems = [p for p in problems if p]
        if problems:
            raise RecipeError(problems)

    def check_environment(self) -> None:
        """What the recipe needs from this machine to train here (not checked by ``--check``, which may
        run on a login node): ``parallel.backend='triton'`` needs CUDA or ``TRITON_INTERPRET=1``."""
        import torch

        from seqpar.kernels._common import select_backend

        try:  # the kernels' own rule, asked for this machine's device
            select_backend(self.parallel.backend, torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu"))
        except ValueError as e:
            raise RecipeError([f"parallel.backend={self.parallel.backend!r}: {e}"]) from None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-able data (every field, defaults filled)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML in the schema's section / field order (``load_recipe`` reads it back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _resolve_cp_auto(cfg: RunConfig) -> Any:
    from seqpar.train.cp_plan import resolve_auto

    try:
        return resolve_auto(cfg)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("parallel.") else f"parallel.cp_schemes='auto': {msg}") from None


def from_dict(tree: Any, *, check_files: bool = False) -> RunConfig:
    """Build and validate a RunConfig; raises RecipeError with one line per bad value.
    ``check_files``: also check the files the recipe names (data inputs: ``seqpar.data.inputs.check_inputs``)."""
    if not isinstance(tree, dict):
        raise RecipeError([f"a recipe must be a mapping of sections {list(SECTIONS)}, got {type(tree).__name__}"])
    try:
        return RunConfig.model_validate(tree, context={"check_files": check_files})
    except ValidationError as e:
        raise RecipeError(format_errors(e, RunConfig)) from None


# ---------------------------------------------------------------------------------------------------
# YAML


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (``1e6``, ``1.0e-4``) and duplicate keys rejected."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _mapping_no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data with the recipe loader; errors are one ``RecipeError`` line with the position."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise RecipeError([f"{where}{pos}: YAML error: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise RecipeError([f"{where}: YAML error: {e}"]) from None


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise RecipeError([f"--set {dotted}=...: expected section.field=value"])
    node = tree
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError([f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a section"])
    node[keys[-1]] = value


def load_recipe(path: str | pathlib.Path, overrides: Optional[list[str]] = None, *,
                check_files: bool = False) -> RunConfig:
    """YAML recipe + ``section.field=value`` overrides (values parsed as YAML) -> validated RunConfig.

    Raises RecipeError (a ValueError; one line per problem) for a missing, unreadable, empty or
    malformed file, a bad override or any bad value; with ``check_files``, also for a file the recipe
    names that is missing or unfit (the training CLI's check before any process group)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError([f"{path}: cannot read the recipe ({e.strerror or e})"]) from None
    tree = parse_yaml(text, str(path))
    if tree is None:
        raise RecipeError([f"{path}: the recipe is empty; it needs at least one of the sections {list(SECTIONS)} "
                           f"(see recipes/)"])
    if not isinstance(tree, dict):
        raise RecipeError([f"{path}: a recipe must be a mapping of sections {list(SECTIONS)}, "
                           f"got {type(tree).__name__}"])
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError([f"--set expects section.field=value, got {item!r}"])
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), parse_yaml(raw, f"--set {key.strip()}"))
    return from_dict(tree, check_files=check_files)


def schema_markdown() -> str:
    """The recipe reference (one table per section: field, type / range, default, description),
    generated from the schema; recipes/README.md embeds it (a test keeps them equal)."""
    from seqpar.megatron.config import describe

    out = []
    for sec in SECTIONS:
        model = RunConfig.model_fields[sec].annotation
        out += [f"### `{sec}`", "", (model.__doc__ or "").strip().splitlines()[0], "",
                "| field | accepts | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = "null" if default is None else json.dumps(default)
            doc = " ".join((info.description or "").split()).replace("|", "\\|")
            out.append(f"| `{name}` | {describe(info.annotation, info.metadata)} | `{shown}` | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m seqpar.train.config: print the recipe reference
    print(schema_markdown())


__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RecipeError", "RecipePath", "RunConfig",
           "SECTIONS",
           "TrainConfig", "from_dict", "load_recipe", "parse_yaml", "schema_markdown"]
