"""Print benchmarks/results/rtn.json as the markdown table in benchmarks/README.md."""

import json
from pathlib import Path

ANCHORS = {("smollm2-135m", "fp"): 12.80, ("smollm2-135m", "w4_asym_g64"): 17.84,
           ("smollm2-135m", "w4_sym_g64"): 19.84, ("smollm2-135m", "w8_per_channel"): 12.83,
           ("gemma3-270m", "fp"): 12.88, ("gemma3-270m", "w4_asym_g128"): 20.49,
           ("gemma3-270m", "w4_sym_g128"): 25.48, ("gemma3-270m", "w8_per_channel"): 12.89}


def main() -> None:
    rows = json.loads((Path(__file__).resolve().parents[1] / "results" / "rtn.json").read_text())
    print("| model | method | ppl | anchor | diff | layers quantized / skipped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        anchor = ANCHORS.get((r["model"], r["method"]))
        diff = f"{100 * (r['ppl'] / anchor - 1):+.2f} %" if anchor else ""
        layers = (f"{r['quantized_layers']} / {r['skipped_layers']}"
                  if "quantized_layers" in r else "")
        print(f"| {r['model']} | {r['method']} | {r['ppl']:.3f} | {anchor or ''} | {diff} | "
              f"{layers} |")


if __name__ == "__main__":
    main()
