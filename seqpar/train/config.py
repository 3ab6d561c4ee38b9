"""Typed run configuration: dataclasses with a docstring per field, validated in ``__post_init__``
(messages name the field and the fix), loaded from YAML recipes with ``--set a.b=v`` overrides.

``RunConfig.check_world(world_size)`` adds the checks that need the launcher's world (TP x CP x DP)
and runs before any process group starts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from seqpar.cp import SUPPORTED
from seqpar.megatron.config import DEFAULT_SCHEMES, KIND_OF_LETTER
from seqpar.megatron.specs import check_pattern
from seqpar.models import SIZES, VARIANTS, preset


RECOMPUTE = ("none", "selective", "full")
SELECTIVE_RECOMPUTE_LETTERS = "AS"
"""Kinds whose core attention is a pure function of (q, k, v), so megatron's selective recompute can
rerun it: softmax and S2 (Lightning is a whole self-attention module; MoH's gates are set per forward)."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ModelConfig:
    preset: str = "tiny-hybrid"
    """Model preset "<size>[-<variant>]": sizes tiny/125m/1b/7b, variants dense/lightning/s2/moh/hybrid."""
    pattern: Optional[str] = None
    """Override the preset's layer pattern: letters A (softmax), S (s2), L (lightning), H (moh)."""
    dtype: str = "fp32"
    """Parameter/compute dtype: "fp32", or "bf16" (bf16 model, fp32 master weights in the optimizer)."""
    s2_block_size: int = 16
    """S2 block size (tokens)."""
    s2_local_blocks: int = 2
    """S2 local window (blocks)."""
    s2_vert_stride: int = 4
    """S2 vertical stride (blocks)."""
    moh_num_shared_heads: int = 1
    """MoH always-on heads."""
    moh_top_k: int = 1
    """MoH routed heads per token."""
    moh_aux_loss_coef: float = 0.01
    """MoH load-balance loss coefficient."""
    # --- h12-engine fields (to be ported into the pydantic schema) ---
    recompute: str = "none"
    """Activation recompute: "none"; "selective" (megatron's core-attention recompute: the attention
    kernel of A and S layers runs again in backward); "full" (every layer's forward runs again in
    backward, megatron recompute_method="uniform", one layer per checkpoint)."""
    # --- end h12-engine fields ---

    def __post_init__(self) -> None:
        size, _, variant = self.preset.partition("-")
        _need(size in SIZES and (not variant or variant in VARIANTS),
              f"model.preset={self.preset!r} is unknown; use <size>[-<variant>] with sizes {sorted(SIZES)} "
              f"and variants {sorted(VARIANTS)}")
        if self.pattern is not None:
            check_pattern(self.pattern, "model.pattern")
        _need(self.dtype in ("fp32", "bf16"), f"model.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        for name in ("s2_block_size", "s2_local_blocks", "s2_vert_stride", "moh_top_k"):
            _need(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        _need(self.moh_aux_loss_coef >= 0, "model.moh_aux_loss_coef must be >= 0")
        _need(self.recompute in RECOMPUTE, f"model.recompute={self.recompute!r} is unknown; use one of {RECOMPUTE}")

    @property
    def layer_pattern(self) -> str:
        return self.pattern or preset(self.preset).pattern


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """TP size; DP = world / (TP x CP)."""
    context_parallel: int = 1
    """CP size (Megatron's zigzag split of every sequence over 2 x CP chunks)."""
    cp_schemes: dict = field(default_factory=lambda: dict(DEFAULT_SCHEMES))
    """CP scheme per kind: softmax/s2/lightning/moh -> allgather | ring | ulysses | usp (seqpar.cp.SUPPORTED)."""
    usp_ulysses_degree: int = 1
    """Ulysses degree for kinds under the "usp" scheme (divides context_parallel and the heads)."""
    backend: str = "auto"
    """Kernel backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"."""
    # --- h12-engine fields (to be ported into the pydantic schema) ---
    pipeline_parallel: int = 1
    """PP size: the layers are split evenly over this many stages (divides the layer count);
    DP = world / (TP x CP x PP)."""
    overlap_grad_reduce: bool = True
    """megatron-core DDP: start each gradient bucket's DP x CP all-reduce (reduce-scatter with
    optim.distributed) during backward, as soon as the bucket's gradients are ready."""
    # --- end h12-engine fields ---

    def __post_init__(self) -> None:
        _need(self.tensor_parallel >= 1, "parallel.tensor_parallel must be >= 1")
        _need(self.context_parallel >= 1, "parallel.context_parallel must be >= 1")
        _need(self.pipeline_parallel >= 1, "parallel.pipeline_parallel must be >= 1")
        unknown = set(self.cp_schemes) - set(DEFAULT_SCHEMES)
        _need(not unknown, f"parallel.cp_schemes has unknown kind(s) {sorted(unknown)}; kinds: "
                           f"{sorted(DEFAULT_SCHEMES)}")
        self.cp_schemes = {**DEFAULT_SCHEMES, **self.cp_schemes}
        for kind, scheme in self.cp_schemes.items():
            ok = sorted(s for k, s in SUPPORTED if k == kind)
            _need((kind, scheme) in SUPPORTED, f"parallel.cp_schemes.{kind}={scheme!r} is not a supported scheme "
                                               f"for {kind}; use one of {ok}")
        _need(self.backend in ("auto", "triton", "torch"), "parallel.backend must be 'auto', 'triton' or 'torch'")


@dataclass
class DataConfig:
    dataset: str = "text"
    """"text" (sentencepiece over local text, packed) or "mqar" (synthetic recall)."""
    seq_len: int = 128
    """Tokens per sequence; a multiple of 2 x CP (x S2 block size when S layers run under CP)."""
    global_batch: int = 8
    """Sequences per step over all DP ranks; a multiple of the DP size."""
    vocab_size: int = 512
    """Tokenizer vocabulary (text) or MQAR vocabulary."""
    text_files: list = field(default_factory=list)
    """Local text files for the tokenizer and the corpus; empty = the Python standard library sources."""
    max_bytes: int = 1_000_000
    """Characters of text read (tokenizer training and corpus)."""
    cache_dir: str = ""
    """Tokenizer cache directory; empty = $SEQPAR_CACHE or ~/.cache/seqpar."""
    mqar_pairs: int = 8
    """MQAR key-value pairs per sequence."""
    mqar_queries: int = 8
    """MQAR queries per sequence."""
    # --- h12-engine fields (to be ported into the pydantic schema) ---
    micro_batch: int = 0
    """Sequences per micro-batch on one DP rank (0 = the whole DP share, one micro-batch); the step
    runs global_batch / (DP x micro_batch) micro-batches through megatron's pipeline schedule."""
    # --- end h12-engine fields ---

    def __post_init__(self) -> None:
        _need(self.dataset in ("text", "mqar"), f"data.dataset must be 'text' or 'mqar', got {self.dataset!r}")
        _need(self.seq_len >= 2, "data.seq_len must be >= 2")
        _need(self.global_batch >= 1, "data.global_batch must be >= 1")
        _need(self.micro_batch >= 0, "data.micro_batch must be >= 0 (0 = one micro-batch per step)")
        _need(self.vocab_size >= 64, "data.vocab_size must be >= 64")
        # the tokenizer's byte fallback alone takes 256 pieces
        _need(self.dataset != "text" or self.vocab_size >= 512,
              f"data.vocab_size must be >= 512 for the text dataset, got {self.vocab_size}")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    # --- h12-engine fields (to be ported into the pydantic schema) ---
    distributed: Optional[bool] = None
    """megatron-core distributed optimizer (fp32 main weights and Adam moments sharded over DP x CP);
    null = on when DP x CP > 1."""
    # --- end h12-engine fields ---

    def __post_init__(self) -> None:
        _need(self.lr > 0, "optim.lr must be > 0")
        _need(0 <= self.min_lr <= self.lr, "optim.min_lr must be in [0, optim.lr]")
        _need(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _need(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 turns clipping off)")
        _need(self.distributed in (None, True, False), "optim.distributed must be true, false or null (auto)")


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Seed of the model initialisation and the data order."""
    out_dir: str = "runs/demo"
    """Run directory: tensorboard events in <out_dir>/tb, checkpoints in <out_dir>/checkpoints."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    log_every: int = 1
    """Tensorboard/progress update interval (steps)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    time_attention: bool = False
    """Log forward time per attention kind to tensorboard (attention_fwd_ms/<kind>); synchronises on CUDA."""

    def __post_init__(self) -> None:
        _need(self.steps >= 1, "train.steps must be >= 1")
        _need(self.save_every >= 0, "train.save_every must be >= 0")
        _need(self.log_every >= 1, "train.log_every must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model preset and attention-kind knobs."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / CP sizes and CP schemes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, sequence length, batch."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, seed, outputs."""

    def __post_init__(self) -> None:
        p = preset(self.model.preset)
        tp, cp = self.parallel.tensor_parallel, self.parallel.context_parallel
        _need(p.num_attention_heads % tp == 0 and p.num_query_groups % tp == 0,
              f"parallel.tensor_parallel={tp} must divide the heads of model.preset={self.model.preset!r} "
              f"({p.num_attention_heads} heads, {p.num_query_groups} kv heads)")
        kinds = {KIND_OF_LETTER[c] for c in self.model.layer_pattern}
        ud = self.parallel.usp_ulysses_degree
        if "usp" in {self.parallel.cp_schemes[k] for k in kinds}:
            _need(ud >= 1 and cp % ud == 0 and p.num_attention_heads % ud == 0,
                  f"parallel.usp_ulysses_degree={ud} must divide parallel.context_parallel={cp} and the "
                  f"{p.num_attention_heads} heads")
        for kind in kinds:
            if cp > 1 and self.parallel.cp_schemes[kind] == "ulysses":
                _need(p.num_attention_heads % cp == 0,
                      f"parallel.context_parallel={cp} must divide the {p.num_attention_heads} heads of "
                      f"model.preset={self.model.preset!r} for cp_schemes.{kind}='ulysses'; pick another scheme")
        _need(self.data.seq_len % (2 * cp) == 0,
              f"data.seq_len={self.data.seq_len} must be a multiple of 2 x parallel.context_parallel = {2 * cp}")
        if cp > 1 and "s2" in kinds:
            unit = 2 * cp * self.model.s2_block_size
            _need(self.data.seq_len % unit == 0,
                  f"data.seq_len={self.data.seq_len} must be a multiple of 2 x CP x model.s2_block_size = {unit} "
                  f"(S2 blocks stay whole under CP)")
        if "moh" in kinds:
            _need(self.model.moh_num_shared_heads + self.model.moh_top_k <= p.num_attention_heads,
                  "model.moh_num_shared_heads + model.moh_top_k must be <= the number of heads")
        # --- h12-engine checks ---
        pp = self.parallel.pipeline_parallel
        _need(p.num_layers % pp == 0,
              f"parallel.pipeline_parallel={pp} must divide the {p.num_layers} layers of model.preset="
              f"{self.model.preset!r}; use a divisor of {p.num_layers}")
        if self.model.recompute == "selective":
            bad = sorted(set(self.model.layer_pattern) - set(SELECTIVE_RECOMPUTE_LETTERS))
            _need(not bad, f"model.recompute='selective' recomputes the core attention of A/S layers only, but "
                           f"the pattern {self.model.layer_pattern!r} has {bad} layers; use model.recompute='full'")
        # --- end h12-engine checks ---
        if self.data.dataset == "mqar":
            _need(self.data.seq_len >= 2 * (self.data.mqar_pairs + self.data.mqar_queries),
                  "data.seq_len must be >= 2 x (data.mqar_pairs + data.mqar_queries)")

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
        share = self.data.global_batch // dp
        mb = self.data.micro_batch
        _need(mb == 0 or share % mb == 0,
              f"data.micro_batch={mb} must divide the sequences per DP rank, data.global_batch / DP = "
              f"{self.data.global_batch} / {dp} = {share}; use a divisor of {share}")
        return dp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig,
             "train": TrainConfig}


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def from_dict(tree: dict) -> RunConfig:
    """Build and validate a RunConfig; unknown sections/fields raise naming them."""
    if not isinstance(tree, dict):
        raise ValueError("a recipe must be a mapping of sections (model, parallel, data, optim, train)")
    unknown = set(tree) - set(_SECTIONS)
    _need(not unknown, f"unknown recipe section(s) {sorted(unknown)}; sections: {sorted(_SECTIONS)}")
    parts = {}
    for name, cls in _SECTIONS.items():
        sec = tree.get(name) or {}
        _need(isinstance(sec, dict), f"recipe section {name!r} must be a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(sec) - names
        _need(not bad, f"unknown field(s) {sorted(f'{name}.{b}' for b in bad)}; fields of {name}: {sorted(names)}")
        for f in dataclasses.fields(cls):
            if f.name in sec and f.type in ("int", "float") and isinstance(sec[f.name], str):
                raise ValueError(f"{name}.{f.name} must be a number, got {sec[f.name]!r}")
        parts[name] = cls(**sec)
    return RunConfig(**parts)


def load_recipe(path: str | pathlib.Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """YAML recipe + ``a.b=value`` overrides (values parsed as YAML) -> validated RunConfig."""
    tree = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), yaml.safe_load(raw))
    return from_dict(tree)
