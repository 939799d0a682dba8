"""AWQ INT4 vs RTN vs nvidia-modelopt's INT4_AWQ on the embedded models, in one process.

    python benchmarks/awq/bench_awq.py [--models gemma3-270m smollm2-135m] [--windows 8] \
        [--n-calib 32] [--methods fp rtn_sym awq_sym modelopt_awq awq_asym]

Every row uses the same calibration tokens (``n_calib`` x 512 from the calibration split,
seed 0) and the first ``windows`` 2048-token windows of the test split. Block 128 for
Gemma-3-270M, 64 for SmolLM2-135M (its hidden size 576 is not a multiple of 128; its
weights already sit on an asymmetric g32 grid). Rows are appended to
benchmarks/results/awq.json as they finish.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
import warnings
from pathlib import Path

import torch

import modelopt_lite as mtl
from modelopt_lite.algorithms.awq import AWQConfig
from modelopt_lite.calib.data import calib_tokens
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.calib.runner import make_forward_loop
from modelopt_lite.config import MaxCalibConfig, QuantConfig, QuantizerSpec, parse_overrides
from modelopt_lite.eval import perplexity

RESULTS = Path(__file__).resolve().parents[1] / "results" / "awq.json"
BLOCK = {"gemma3-270m": 128, "smollm2-135m": 64}
SEQ = 512


def int4(block: int, symmetric: bool, algorithm) -> QuantConfig:
    return QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=block,
                                            symmetric=symmetric), algorithm=algorithm)


def modelopt_awq(model, block, loop):
    warnings.filterwarnings("ignore")
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = block
    return mtq.quantize(model, cfg, loop)


def quantizer_for(method: str, block: int, awq: AWQConfig):
    if method == "rtn_sym":
        return lambda m, loop: mtl.quantize(m, int4(block, True, MaxCalibConfig()), progress=False)
    if method in ("awq_sym", "awq_asym"):
        cfg = int4(block, method == "awq_sym", awq)
        return lambda m, loop: mtl.quantize(m, cfg, forward_loop=loop, progress=True)
    if method == "modelopt_awq":
        return lambda m, loop: modelopt_awq(m, block, loop)
    raise ValueError(method)


def run(name: str, methods, windows: int, n_calib: int, awq: AWQConfig, machine: str, out: Path):
    test = wiki_text("test")
    model, tok = load_model(name)
    tokens = calib_tokens([wiki_text("calibration")], tok, n_samples=n_calib, seq_len=SEQ, seed=0)
    loop = make_forward_loop(tokens, batch_size=1, progress=False)
    base = {"model": name, "calib": f"{n_calib} x {SEQ} tokens, calibration split, seed 0",
            "machine": machine, "date": datetime.date.today().isoformat(),
            "block_size": BLOCK[name]}
    for method in methods:
        model, tok = load_model(name)
        calib_s = calib_cpu_s = None
        if method != "fp":
            start, cpu = time.perf_counter(), time.process_time()
            quantizer_for(method, BLOCK[name], awq)(model, loop)
            calib_s = round(time.perf_counter() - start, 1)
            calib_cpu_s = round(time.process_time() - cpu, 1)
        res = perplexity(model, tok, test, windows=windows, progress=False)
        row = {**base, "method": method, "ppl": round(res.ppl, 4), "calib_s": calib_s,
               "calib_cpu_s": calib_cpu_s, "eval_tokens": res.tokens}
        if method.startswith("awq"):
            row["awq_config"] = {k: v for k, v in awq.__dict__.items()}
        print(json.dumps(row), flush=True)
        save_row(row, out)
        del model


def save_row(row: dict, out: Path = RESULTS) -> None:
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if (r["model"], r["method"]) != (row["model"], row["method"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows + [row], indent=1))


def markdown_table(path: Path = RESULTS) -> str:
    """The results file as a markdown table (for benchmarks/README.md)."""
    head = "| model | method | ppl | calib | eval tokens | calib s (CPU s) | machine | date |"
    lines = [head, "|" + "---|" * 8]
    for r in json.loads(path.read_text()):
        t = "" if r["calib_s"] is None else f"{r['calib_s']} ({r.get('calib_cpu_s')})"
        lines.append(f"| {r['model']} (block {r['block_size']}) | {r['method']} | {r['ppl']:.3f} "
                     f"| {r['calib']} | {r['eval_tokens']} | {t} | {r['machine']} | {r['date']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    ap.add_argument("--methods", nargs="+",
                    default=["fp", "rtn_sym", "awq_sym", "modelopt_awq", "awq_asym"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--machine", default="cpu-2core")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--search-tokens", type=int, default=AWQConfig.search_tokens)
    ap.add_argument("--awq-set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="extra AWQConfig fields for our rows, e.g. n_grid=40 duo_scaling=false")
    ap.add_argument("--table", action="store_true", help="print the results as markdown and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(args.out))
        return
    torch.set_num_threads(args.threads)
    machine = f"{args.machine} ({args.threads} torch thread{'s' * (args.threads > 1)})"
    for name in args.models:
        awq = AWQConfig(**{"search_tokens": args.search_tokens,
                           **parse_overrides(AWQConfig, args.awq_set)})
        run(name, args.methods, args.windows, args.n_calib, awq, machine, args.out)


if __name__ == "__main__":
    main()
