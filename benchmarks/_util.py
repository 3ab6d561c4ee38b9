"""Table and JSON helpers of the stand-alone scripts (engine_recompute, export_cache,
kernel_resources): the harness's own (seqpar.bench.report), so there is one way to print a table."""

from __future__ import annotations

import json

from seqpar.bench.report import device_name, print_table  # noqa: F401


def write_json(path: str | None, payload) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {path}")
