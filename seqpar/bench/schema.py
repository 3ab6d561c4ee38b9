"""The JSON schema of a benchmark report (``runs/bench/bench.json``), as pydantic models.

Documented field by field in ``docs/bench.md``; :func:`validate` is what the harness runs before
it writes, and what ``tests/test_bench.py`` runs on a smoke report.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Scalar = Union[int, float, str, bool, None]


class StrictModel(BaseModel):
    """Unknown fields are errors (a report never carries a field the schema does not document)."""

    model_config = ConfigDict(extra="forbid")


class RunStamp(StrictModel):
    """What every measured report (bench, quality) is stamped with; each adds its own fields."""

    date: str = Field(description="UTC ISO-8601 time the run started")
    device: str = Field(description="GPU name, or the CPU model and the threads / cores the run used")
    device_type: Literal["cpu", "cuda"]
    threads: int = Field(ge=1, description="torch intra-op threads (per worker), set explicitly")
    python: str
    torch: str
    seqpar: str = Field(description="package version and the git commit at the start of the run when known")
    load_avg: Optional[list[float]] = Field(description="1/5/15-min load average at start and end (6 numbers)")


class Stamp(RunStamp):
    size: Literal["smoke", "cpu", "gpu"] = Field(description="shape set: smoke (tests), cpu (small), gpu (papers')")
    triton: Optional[str]
    fla: Optional[str] = Field(description="flash-linear-attention (fla-core) version, None when not installed")


class Timing(StrictModel):
    min: float = Field(ge=0, description="ms per call, best repetition")
    median: float = Field(ge=0)
    max: float = Field(ge=0)
    reps: int = Field(ge=5, description="repetitions (interleaved with the compared cases)")
    inner: int = Field(ge=1, description="calls between two CUDA events per repetition (1 on CPU)")
    spread: float = Field(description="median / min")
    noisy: bool = Field(description="spread > 1.25: not fit for comparison")


class Result(StrictModel):
    group: str = Field(description="the compared set this case belongs to (same shape, same mode)")
    impl: str
    mode: Literal["fwd", "fwd+bwd", "step"]
    params: dict[str, Scalar]
    status: Literal["ok", "error"]
    error: Optional[str] = None
    ms: Optional[Timing] = None
    flops: Optional[float] = Field(None, description="FLOPs the mask needs per call (seqpar.kernels.flops)")
    tflops: Optional[float] = Field(None, description="flops / median time")
    peak_mem_mib: Optional[float] = Field(None, description="peak memory one call allocates above its inputs")
    first_call_s: Optional[float] = Field(None, description="wall time of the first call (compilation included)")
    metrics: dict[str, float] = Field(default_factory=dict, description="derived numbers, e.g. tokens_per_s")


class Missing(StrictModel):
    impl: str
    reason: str


class Suite(StrictModel):
    name: str
    title: str
    status: Literal["ok", "failed", "skipped"]
    error: Optional[str] = None
    seconds: float
    results: list[Result] = Field(default_factory=list)
    tables: dict[str, list[dict[str, Scalar]]] = Field(default_factory=dict,
                                                       description="modelled / derived tables (not timings)")
    missing: list[Missing] = Field(default_factory=list, description="baselines that could not run, with why")
    notes: list[str] = Field(default_factory=list)
    plots: list[str] = Field(default_factory=list, description="PNG files next to the JSON")


class Report(StrictModel):
    schema_version: Literal[1]  # seqpar.bench.report.SCHEMA_VERSION
    stamp: Stamp
    suites: list[Suite]


def validate(payload: dict) -> Report:
    """Parse a report dict (raises ``pydantic.ValidationError`` naming the bad field)."""
    return Report.model_validate(payload)
