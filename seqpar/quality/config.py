"""What the quality harness trains: the model set, the sizes (``--scale``), the tasks' settings, and
the parameter matching that makes every model as large as the dense one.

Equal parameters: Lightning layers carry an output-gate projection and a per-head norm, MoH layers a
router; the harness lowers each model's FFN width (one width for all its layers) to the one whose
total parameter count (``seqpar.train.memory.closed_form_params``, checked against the built model)
is closest to the dense model's, and reports every count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from seqpar.models import ModelPreset

# name -> (layer pattern, what it is); the pattern tiles over the layers (seqpar.megatron.layer_specs)
MODELS: dict[str, tuple[str, str]] = {
    "dense": ("A", "softmax attention in every layer (the baseline)"),
    "s2": ("S", "S2 sparse-sharded attention in every layer"),
    "s2-hybrid": ("SSSA", "S2 with one dense layer in four (the S2 paper's hybrid)"),
    "lightning": ("L", "Lightning (linear) attention in every layer"),
    "hybrid": ("LLLA", "Lightning 3 : 1 softmax (MiniMax-01 / LASP-2H)"),
    "moh": ("H", "MoH in every layer, 75% of heads per token"),
}
DEFAULT_MODELS = ("dense", "s2", "s2-hybrid", "lightning", "hybrid", "moh")
TASKS = ("text", "mqar", "passkey")


@dataclass(frozen=True)
class TextTask:
    """(a) language modelling on the held-out works of the Shakespeare corpus."""

    seq_len: int
    batch: int
    steps: int
    lr: float
    vocab_size: int
    """sentencepiece BPE pieces, trained on the training works."""
    val_windows: int
    """Held-out windows of ``seq_len`` tokens evaluated (from the start of the held-out stream)."""
    max_bytes: int = 6_000_000
    """Characters of the training works read (all of them at 6 MB)."""


@dataclass(frozen=True)
class MQARTask:
    """(b) multi-query associative recall (Zoology, queries spread over noise): trained on a mixture
    of the settings, one setting per step in turn, evaluated per setting."""

    settings: tuple[tuple[int, int, int], ...]
    """(key-value pairs, queries, sequence length) of each setting."""
    batch: int
    steps: int
    lr: float
    vocab_size: int
    """Token ids of the task: keys ``[4, vocab/2)``, values ``[vocab/2, vocab)``."""
    eval_sequences: int


@dataclass(frozen=True)
class PasskeyTask:
    """(c) passkey retrieval at one length, trained with the needle at random depths, evaluated at
    fixed depths."""

    seq_len: int
    batch: int
    steps: int
    lr: float
    key_len: int
    vocab_size: int
    """Token ids of the task: markers, 10 digits, noise ``[13, vocab)``."""
    depths: tuple[float, ...]
    eval_sequences: int


@dataclass(frozen=True)
class Scale:
    """One size of the whole comparison (``--scale``)."""

    name: str
    shape: ModelPreset
    """The dense model's shape (the pattern is each model's)."""
    text: TextTask
    mqar: MQARTask
    passkey: PasskeyTask
    seeds: tuple[int, ...]
    s2: dict[str, int] = field(default_factory=lambda: {"s2_block_size": 16, "s2_local_blocks": 2,
                                                        "s2_vert_stride": 4})
    warmup_steps: int = 30
    weight_decay: float = 0.0
    description: str = ""

    def task(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), as the report stores them."""
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        return json.loads(json.dumps(d))


SCALES: dict[str, Scale] = {
    # the smoke test of `make test`: every model and task runs, nothing is expected to be learned
    # except the easiest MQAR setting by the dense model (tests/test_quality.py)
    "smoke": Scale(
        name="smoke", shape=ModelPreset(4, 32, 4, 2, 64),
        text=TextTask(seq_len=32, batch=4, steps=4, lr=3e-3, vocab_size=512, val_windows=4, max_bytes=300_000),
        mqar=MQARTask(settings=((2, 4, 16),), batch=32, steps=60, lr=1e-2, vocab_size=16, eval_sequences=64),
        passkey=PasskeyTask(seq_len=32, batch=4, steps=4, lr=3e-3, key_len=2, vocab_size=32, depths=(0.0, 1.0),
                            eval_sequences=8),
        seeds=(0,), warmup_steps=5, description="the smoke test's size: checks the harness, not the models"),
    # the default on CPU: two seeds in about 20 minutes of 2 idle cores (2,367 CPU-s measured on
    # the build machine: README "Quality"); the 256-token passkey and 400 MQAR steps of the first table
    # (1,447 CPU-s per seed) did not fit two seeds
    "cpu": Scale(
        name="cpu", shape=ModelPreset(4, 64, 4, 2, 128),
        text=TextTask(seq_len=128, batch=16, steps=200, lr=3e-3, vocab_size=512, val_windows=64),
        mqar=MQARTask(settings=((4, 16, 64), (8, 16, 128)), batch=32, steps=300, lr=1e-2, vocab_size=128,
                      eval_sequences=256),
        passkey=PasskeyTask(seq_len=128, batch=16, steps=150, lr=3e-3, key_len=4, vocab_size=64,
                            depths=(0.0, 0.25, 0.5, 0.75, 1.0), eval_sequences=64),
        seeds=(0, 1), description="tiny models on 2 CPU cores"),
    # a GPU run (one device): wider and longer, the same recipe otherwise
    "gpu": Scale(
        name="gpu", shape=ModelPreset(8, 256, 8, 4, 704),
        text=TextTask(seq_len=1024, batch=32, steps=3000, lr=1e-3, vocab_size=4096, val_windows=256,
                      max_bytes=6_000_000),
        mqar=MQARTask(settings=((16, 64, 256), (32, 128, 512), (64, 256, 1024), (64, 256, 2048)), batch=64, steps=4000, lr=1e-3,
                      vocab_size=8192, eval_sequences=1024),
        passkey=PasskeyTask(seq_len=4096, batch=16, steps=2000, lr=1e-3, key_len=5, vocab_size=256,
                            depths=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), eval_sequences=256),
        seeds=(0, 1, 2), s2={"s2_block_size": 64, "s2_local_blocks": 4, "s2_vert_stride": 8}, warmup_steps=100,
        description="8 layers, width 256 on one GPU"),
}


MIN_MODEL_VOCAB = 64
"""The recipe's smallest vocabulary (``data.vocab_size``): a synthetic task with fewer token ids
leaves the rest of the embedding rows unused."""


def model_vocab(task: Any) -> int:
    """The model's vocabulary for ``task``: its token ids, at least :data:`MIN_MODEL_VOCAB`."""
    return max(task.vocab_size, MIN_MODEL_VOCAB)


def moh_heads(heads: int) -> dict[str, int]:
    """MoH at 75% of heads per token: a quarter of the heads shared (at least one), the rest of the
    75% routed top-k."""
    active = (3 * heads) // 4
    shared = max(1, heads // 4)
    if active <= shared or active > heads:
        raise ValueError(f"MoH at 75% of heads needs >= 4 attention heads, got {heads}")
    return {"moh_num_shared_heads": shared, "moh_top_k": active - shared}


def model_knobs(name: str, scale: Scale) -> dict[str, Any]:
    """The recipe's ``model`` fields of a model besides its shape (S2 layout, MoH heads)."""
    pattern = MODELS[name][0]
    out: dict[str, Any] = {}
    if "S" in pattern:
        out.update(scale.s2)
    if "H" in pattern:
        out.update(moh_heads(scale.shape.num_attention_heads))
    return out


def param_count(shape: ModelPreset, pattern: str, vocab: int, knobs: dict[str, Any]) -> int:
    """Parameters of the whole model (one rank, no parallelism), by the closed form of
    ``seqpar.train.memory`` (the built model is checked against it by the harness)."""
    from seqpar.megatron.config import layer_pattern
    from seqpar.train.memory import closed_form_params

    return closed_form_params(shape, layer_pattern(pattern, shape.num_layers), vocab, 1, first=True, last=True,
                              moh_num_shared_heads=knobs.get("moh_num_shared_heads", 0))


def matched_shape(name: str, scale: Scale, vocab: int) -> tuple[ModelPreset, int, int]:
    """(shape, its parameters, the dense model's parameters): ``name``'s shape with the FFN width whose
    parameter count is closest to the dense model's at vocabulary ``vocab`` (the smaller width on a tie)."""
    pattern = MODELS[name][0]
    knobs = model_knobs(name, scale)
    target = param_count(scale.shape, "A", vocab, {})
    base = scale.shape
    best: Optional[tuple[int, int, int]] = None
    for f in range(max(1, base.ffn_hidden_size // 2), 2 * base.ffn_hidden_size + 1):
        n = param_count(replace(base, ffn_hidden_size=f), pattern, vocab, knobs)
        cand = (abs(n - target), f, n)
        if best is None or cand < best:
            best = cand
    assert best is not None
    return replace(base, ffn_hidden_size=best[1], pattern=pattern), best[2], target
