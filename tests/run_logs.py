"""Reading what a training run logs, for the tests: `<stage>/steps.jsonl` (written by `kosmos_g.callbacks.StepLog`)."""

from __future__ import annotations

import json
from pathlib import Path


def read_steps(path: Path) -> dict[int, dict]:
    """steps.jsonl as {step: record} (the last record of a step wins)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out
