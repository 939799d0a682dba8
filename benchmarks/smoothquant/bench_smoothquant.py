"""SmoothQuant W8A8 (ours, fixed and searched alpha) vs W8A8 max vs nvidia-modelopt, in one process.

    python benchmarks/smoothquant/bench_smoothquant.py [--models smollm2-135m gemma3-270m] \
        [--windows 8] [--n-calib 32] [--methods fp w8a8_max sq_fixed sq_search modelopt_sq \
        modelopt_int8] [--act-calibrator max] [--layer-errors 12]

Every row uses the same calibration tokens (``n_calib`` x 512 from the calibration split,
seed 0) and the first ``windows`` 2048-token windows of the test split. Ours: INT8 symmetric
weights per output channel, INT8 symmetric per-tensor static activations (TensorRT's Q/DQ),
decoder linears only (lm_head and embeddings stay float, as in modelopt's configs). Rows are
appended to benchmarks/results/smoothquant.json as they finish. ``--layer-errors N`` prints
the N groups with the largest searched block output error, with their alpha.
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
from modelopt_lite.algorithms.smoothquant import SmoothQuantConfig
from modelopt_lite.calib.data import calib_tokens
from modelopt_lite.config import parse_overrides
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.calib.runner import make_forward_loop
from modelopt_lite.eval import perplexity

RESULTS = Path(__file__).resolve().parents[1] / "results" / "smoothquant.json"
SEQ = 512
METHODS = ("fp", "w8a8_max", "sq_fixed", "sq_search", "modelopt_sq", "modelopt_int8")


SQ_OVERRIDES: dict = {}  # SmoothQuantConfig fields for sq_search, from --sq-set


def ours(method: str, calibrator: str):
    base = mtl.get_preset("int8_smoothquant")
    inp = base.input.__class__(**{**base.input.__dict__, "calibrator": calibrator})
    if method == "w8a8_max":
        return mtl.get_preset("w8a8")
    if method == "sq_fixed":
        return base.replace(input=inp, algorithm=SmoothQuantConfig(alpha=0.5, rotate=()))
    return base.replace(input=inp, algorithm=SmoothQuantConfig(**{"alpha": None, **SQ_OVERRIDES}))


def modelopt(model, cfg_name: str, loop):
    warnings.filterwarnings("ignore")
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)


def quantize(method: str, model, loop, calibrator: str):
    if method == "modelopt_sq":
        return modelopt(model, "INT8_SMOOTHQUANT_CFG", loop)
    if method == "modelopt_int8":
        return modelopt(model, "INT8_DEFAULT_CFG", loop)
    return mtl.quantize(model, ours(method, calibrator), forward_loop=loop, progress=True)


def print_layer_errors(model, n: int) -> None:
    report = getattr(model, "_smoothquant_report", {})
    worst = sorted(report.items(), key=lambda kv: -kv[1].get("error", 0.0))[:n]
    for key, rec in worst:
        e05 = rec["errors"].get(0.5)
        print(f"  {key:<48} alpha {rec['alpha']:.3f}  clip {rec.get('clip', 1.0):.2f}  "
              f"rel.err {rec['error']:.3e}  (alpha 0.5: {e05:.3e})", flush=True)
    for field in ("alpha", "clip"):
        values = [rec.get(field, 1.0) for rec in report.values()]
        if values:
            hist = {v: values.count(v) for v in sorted(set(values))}
            print(f"  chosen {field}s: {hist}", flush=True)


def run(name, methods, windows, n_calib, calibrator, machine, out, layer_errors):
    test = wiki_text("test")
    _, tok = load_model(name)
    tokens = calib_tokens([wiki_text("calibration")], tok, n_samples=n_calib, seq_len=SEQ, seed=0)
    loop = make_forward_loop(tokens, batch_size=1, progress=False)
    calib = f"{n_calib} x {SEQ} tokens, calibration split, seed 0"
    for method in methods:
        model, tok = load_model(name)
        calib_s = None
        if method != "fp":
            start = time.perf_counter()
            quantize(method, model, loop, calibrator)
            calib_s = round(time.perf_counter() - start, 1)
        if method == "sq_search" and layer_errors:
            print_layer_errors(model, layer_errors)
        res = perplexity(model, tok, test, windows=windows, progress=False)
        row_calib = calib if method in ("fp", "modelopt_sq", "modelopt_int8") \
            else f"{calib}; activation calibrator {calibrator}"
        row = {"model": name, "method": method, "ppl": round(res.ppl, 4), "calib_s": calib_s,
               "eval_tokens": res.tokens, "calib": row_calib, "machine": machine,
               "date": datetime.date.today().isoformat()}
        if method == "sq_search" and SQ_OVERRIDES:
            row["sq_config"] = {k: list(v) if isinstance(v, tuple) else v
                                for k, v in SQ_OVERRIDES.items()}
        print(json.dumps(row), flush=True)
        if out is not None:
            save_row(row, out)
        del model


def save_row(row: dict, out: Path = RESULTS) -> None:
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if (r["model"], r["method"]) != (row["model"], row["method"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows + [row], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--act-calibrator", default="max", choices=("max", "percentile", "mse"))
    ap.add_argument("--layer-errors", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--machine", default="cpu-2core")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-save", action="store_true", help="print rows only (ablations)")
    ap.add_argument("--sq-set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="SmoothQuantConfig overrides for sq_search, e.g. refine=3 "
                         "alpha_grid=0,0.25,0.5,0.75,1")
    args = ap.parse_args()
    SQ_OVERRIDES.update(parse_overrides(SmoothQuantConfig, args.sq_set))
    torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args.methods, args.windows, args.n_calib, args.act_calibrator, args.machine,
            None if args.no_save else args.out, args.layer_errors)


if __name__ == "__main__":
    main()
