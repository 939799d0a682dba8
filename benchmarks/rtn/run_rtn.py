"""Round-to-nearest baselines with modelopt_lite on the embedded models (test-split perplexity).

    python benchmarks/rtn/run_rtn.py [--models smollm2-135m gemma3-270m] [--windows 4]

Decoder linears only (lm_head and embeddings excluded). Writes benchmarks/results/rtn.json as
rows {"model", "method", "ppl", "eval_tokens", "calib", "machine", "date", ...}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import modelopt_lite as mtl
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.eval import perplexity

RESULTS = Path(__file__).resolve().parents[1] / "results" / "rtn.json"


def w4(block, symmetric, integer_zero=False):
    return QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block",
                                            block_size=block, symmetric=symmetric,
                                            integer_zero=integer_zero))


METHODS = {
    "w8_per_channel": QuantConfig(weight=QuantizerSpec(num_bits=8)),
    "w4_sym_g64": w4(64, True),
    "w4_asym_g64": w4(64, False),
    "w4_sym_g128": w4(128, True),
    "w4_asym_g128": w4(128, False),
    "w4_asym_int_g64": w4(64, False, True),     # integer zero points (AutoAWQ / GPTQ style)
    "w4_asym_int_g128": w4(128, False, True),
}


def machine() -> str:
    return f"cpu-{torch.get_num_threads()}thread {platform.machine()}"


def run(model_name: str, windows: int, methods) -> list[dict]:
    test = wiki_text("test")
    rows = []
    model, tok = load_model(model_name)
    fp = perplexity(model, tok, test, windows=windows, progress=False)
    base = {"model": model_name, "eval_tokens": fp.tokens, "calib": "none (weight-only RTN)",
            "machine": machine(), "date": datetime.date.today().isoformat()}
    rows.append({**base, "method": "fp", "ppl": round(fp.ppl, 4)})
    print(rows[-1], flush=True)
    for method in methods:
        model, tok = load_model(model_name)
        start = time.time()
        mtl.quantize(model, METHODS[method], progress=False)
        quantize_s = time.time() - start
        layers = model._modelopt_lite["layers"]
        res = perplexity(model, tok, test, windows=windows, progress=False)
        rows.append({**base, "method": method, "ppl": round(res.ppl, 4),
                     "quantized_layers": sum(not r["skipped"] for r in layers),
                     "skipped_layers": sum(bool(r["skipped"]) for r in layers),
                     "quantize_s": round(quantize_s, 2)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    rows = [r for m in args.models for r in run(m, args.windows, args.methods)]
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []  # re-read: runs may overlap
    keep = [r for r in old if (r["model"], r["method"]) not in {(x["model"], x["method"])
                                                               for x in rows}]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(keep + rows, indent=1))


if __name__ == "__main__":
    main()
