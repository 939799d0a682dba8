"""Print the README tables from results/sparsity.json and results/sparse_speed_<gpu>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
METHODS = ("dense", "magnitude", "sparsegpt", "modelopt_magnitude", "modelopt_sparsegpt",
           "sparsegpt_finetuned")


def accuracy_table() -> str:
    rows = json.loads((RESULTS / "sparsity.json").read_text())
    out = ["| model | method | test ppl | calib / prune s | eval tokens |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], METHODS.index(r["method"]))):
        cs = "-" if r["calib_s"] is None else f"{r['calib_s']:.0f}"
        out.append(f"| {r['model']} | {r['method']} | {r['ppl']:.2f} | {cs} | {r['eval_tokens']} |")
    return "\n".join(out)


def speed_table(gpu: str) -> str:
    data = json.loads((RESULTS / f"sparse_speed_{gpu}.json").read_text())
    out = [f"{data['gpu']}, torch {data['torch']}, {data['timing']}", "",
           "| K×N | M | dense cuBLAS µs | 2:4 sparse µs (cuSPARSELt) | speed-up |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['K']}×{r['N']} | {r['M']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                   f"{r['speedup']:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    print(accuracy_table())
    print()
    print(speed_table(sys.argv[1] if len(sys.argv) > 1 else "h100"))
