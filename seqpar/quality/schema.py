"""The JSON schema of a quality report (``runs/quality/quality.json``), as pydantic models.

Documented field by field in ``docs/quality.md``; :func:`validate` runs before the harness writes,
and in ``tests/test_quality.py`` on a smoke report.

Metric names (``Run.metrics`` and ``Summary.metric``):

- ``val_loss``, ``val_ppl`` (text): cross-entropy (nats / token) and perplexity on the held-out works;
- ``mqar_acc_p{P}_n{N}`` (mqar): answer accuracy with P key-value pairs (and P queries) in N tokens;
  ``mqar_acc_mean``: their mean;
- ``passkey_acc_d{D}`` (passkey): whole-key exact match with the needle at depth D (0.00 = the start
  of the sequence, 1.00 = right before the query); ``passkey_digit_acc_d{D}``: per-digit accuracy;
  ``passkey_acc_mean``: exact match averaged over the depths.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from seqpar.bench.schema import RunStamp, StrictModel


class Stamp(RunStamp):
    scale: Literal["smoke", "cpu", "gpu"]
    seeds: list[int] = Field(min_length=1, description="run seeds: model initialisation and training data order")
    eval_seed: int = Field(description="seed of the evaluation sets (the same sequences for every model and seed)")
    workers: int = Field(ge=1, description="processes that ran the runs side by side")
    megatron_core: Optional[str]
    wall_s: float = Field(ge=0, description="wall time of the whole harness")
    cpu_s: float = Field(ge=0, description="CPU time (user + sys) of the harness and all its workers")


class ModelInfo(StrictModel):
    name: str
    pattern: str = Field(description="layer letters, tiled over the layers: A softmax, S S2, L Lightning, H MoH")
    description: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int = Field(description="MLP width chosen so the parameter count matches the dense model's")
    knobs: dict[str, int] = Field(description="S2 layout / MoH heads of the model")
    params: dict[str, int] = Field(description="task -> parameters of the built model (vocabularies differ by task)")
    non_embedding_params: int = Field(description="parameters without the embedding and output layer (any task)")
    params_vs_dense: float = Field(description="(params - dense params) / dense params, the same for every task")


class Run(StrictModel):
    task: Literal["text", "mqar", "passkey"]
    model: str
    seed: int
    status: Literal["ok", "failed"]
    error: Optional[str] = None
    traceback: Optional[str] = None
    params: Optional[int] = Field(None, description="parameters of the built model")
    metrics: dict[str, float] = Field(description="see the module docstring for the names")
    losses: list[tuple[int, float]] = Field(description="(step, training loss) about every 5% of the run")
    cpu_s: float = Field(ge=0, description="CPU time of the run in its worker")
    wall_s: float = Field(ge=0)


class Summary(StrictModel):
    model: str
    metric: str
    mean: float
    min: float
    max: float
    n: int = Field(ge=1, description="seeds that finished")


class Claim(StrictModel):
    claim: str = Field(description="a paper's finding, as the harness tests its direction")
    verdict: Literal["holds", "does not hold", "within the seeds' spread", "not measured"] = Field(
        description="the direction on this run's seeds (seqpar.quality.report.claims); not measured when a run "
                    "it needs failed or was not run")
    evidence: str


class Report(StrictModel):
    schema_version: Literal[2]
    stamp: Stamp
    scale: dict = Field(description="the --scale settings: model shape, per-task length, batch, steps, lr")
    data: dict = Field(description="the text corpus: file, checksum, works, tokens, tokenizer (empty without text)")
    models: list[ModelInfo]
    runs: list[Run]
    summary: list[Summary]
    claims: list[Claim]
    notes: list[str]
    plot: Optional[str] = Field(description="the PNG next to the JSON, None when matplotlib is missing")


def validate(payload: dict) -> Report:
    """Parse a report dict (raises ``pydantic.ValidationError`` naming the bad field)."""
    return Report.model_validate(payload)
