"""Shared helpers for the QAT benchmarks: result rows in benchmarks/results/qat.json."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "qat.json"
MACHINE = "cpu-2core"


def row(model, method, metric, value, steps=0, train_s=0.0):
    return {"model": model, "method": method, "metric": metric, "value": round(value, 4),
            "steps": steps, "train_s": round(train_s, 1), "machine": MACHINE,
            "date": datetime.date.today().isoformat()}


def write_rows(rows, model):
    """Replace this model's rows in the results file, keep the others."""
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    keep = [r for r in old if r["model"] != model]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(keep + rows, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
