"""Q/DQ ONNX export on SmolLM2-135M and a small Fashion-MNIST CNN: time, sizes, errors, quality.

    python benchmarks/export/run_export.py [--recipes w8a8 int4_sym_g64] [--skip-cnn]

For each recipe: quantize SmolLM2 (calibration split, 16 x 256 tokens), export (timed), save
a second copy with external weights, run ``trt_check``, then on one 2048-token test window
compare onnxruntime (graph as written, and fully optimised) with the PyTorch fake-quant model:
logits max abs / relative error and perplexity. The CNN (trained for a few hundred steps on
Fashion-MNIST, W8A8) reports the same plus test accuracy. Writes
benchmarks/results/onnx_export.json.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.eval import text_windows, token_ids, window_bos
from modelopt_lite.export import compare_with_torch, export_onnx, trt_check
from modelopt_lite.export.onnx import save_atomic
from modelopt_lite.export.verify import errors, run_onnx, run_torch, session

RESULTS = Path(__file__).resolve().parents[1] / "results" / "onnx_export.json"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
RECIPES = {
    "w8a8": "w8a8",
    "int8_smoothquant": "int8_smoothquant",
    "int4_sym_g64": QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block",
                                                     block_size=64)),
}


def sizes(path: Path) -> dict:
    ext = path.parent / "ext" / path.name
    ext.parent.mkdir(exist_ok=True)
    save_atomic(onnx.load(str(path)), ext, external_data=True)
    data = ext.parent / (ext.name + ".data")
    return {"inline_bytes": path.stat().st_size, "graph_only_bytes": ext.stat().st_size,
            "external_data_bytes": data.stat().st_size,
            "trt_check_external_errors": len(trt_check(ext))}


def nll_ppl(logits: np.ndarray, ids: torch.Tensor) -> float:
    lg = torch.from_numpy(logits[0, :-1]).double()
    nll = torch.logsumexp(lg, -1) - lg.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def test_window(tok) -> torch.Tensor:
    bos = window_bos(tok, None)
    chunk = text_windows(token_ids(tok, wiki_text("test")), 2048 - (bos is not None), 1)[0]
    return (chunk if bos is None else torch.cat([torch.tensor([bos]), chunk]))[None]


def run_llm(name: str, recipe, workdir: Path) -> dict:
    model, tok = load_model("smollm2-135m")
    ids = test_window(tok)
    fp_ppl = nll_ppl(run_torch(model, ids), ids)
    t0 = time.perf_counter()
    mtl.quantize(model, recipe, calib=[wiki_text("calibration")], tokenizer=tok, n_samples=16,
                 seq_len=256, progress=False)
    calib_s = time.perf_counter() - t0
    path = workdir / f"smollm2_{name}.onnx"
    result = export_onnx(model, ids[:, :32], path)
    row = {"model": "SmolLM2-135M-Instruct", "recipe": name, "calib": "16 x 256 tokens",
           "quantize_s": round(calib_s, 1), "export_s": round(result.seconds, 1),
           "opset": result.opset, "qdq_nodes": result.qdq_nodes,
           "trt_check_errors": len(trt_check(path)), **sizes(path)}
    ref = run_torch(model, ids)
    for level in ("none", "all"):
        out = run_onnx(path, model, ids, level)
        err = errors(out, ref)
        row[f"ort_{level}"] = {"max_abs": err["max_abs"], "rel_l2": err["rel"],
                               "ppl": nll_ppl(out, ids)}
    row.update({"eval": f"1 x {ids.shape[1]} tokens, test split", "ppl_float": fp_ppl,
                "ppl_torch_fakequant": nll_ppl(ref, ids)})
    return row


def fmnist(split: str):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, x, y, steps=400, batch=64):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(logits: np.ndarray, y) -> float:
    return float((logits.argmax(-1) == y.numpy()).mean())


def run_cnn(workdir: Path) -> dict:
    torch.manual_seed(0)
    xtr, ytr = fmnist("train")
    xte, yte = fmnist("test")
    model = train(small_cnn(), xtr, ytr)
    fp_acc = accuracy(run_torch(model, xte), yte)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(xtr[:512]), progress=False)
    path = workdir / "cnn_w8a8.onnx"
    result = export_onnx(model, xte[:2], path)
    ref = run_torch(model, xte)
    row = {"model": "Fashion-MNIST CNN (2 conv + 2 linear, 421k params, 400 Adam steps)",
           "recipe": "w8a8", "export_s": round(result.seconds, 1), "opset": result.opset,
           "qdq_nodes": result.qdq_nodes, "trt_check_errors": len(trt_check(path)),
           **sizes(path), "acc_float": fp_acc, "acc_torch_fakequant": accuracy(ref, yte),
           "eval": "10,000 test images"}
    for level in ("none", "basic", "all"):
        sess = session(path, level)
        out = np.concatenate([run_onnx(path, model, xte[i:i + 2000], sess=sess)
                              for i in range(0, len(xte), 2000)])
        err = errors(out, ref)
        row[f"ort_{level}"] = {"max_abs": err["max_abs"], "rel_l2": err["rel"],
                               "acc": accuracy(out, yte)}
    assert compare_with_torch(model, xte[:4], path)["rel"] < 1e-5
    return row


def table(rows) -> str:
    """The README table: one line per (model, recipe)."""
    kb = lambda n: f"{n / 1024:,.0f} KiB"  # noqa: E731
    out = ["| model | recipe | export s | file (inline) | graph + external data | trt_check | "
           "ort none vs torch: max abs / rel L2 | ort all: rel L2 | quality: float / torch "
           "fake-quant / ort none / ort all |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "acc_float" in r:
            q = [r["acc_float"], r["acc_torch_fakequant"], r["ort_none"]["acc"], r["ort_all"]["acc"]]
            quality = "acc " + " / ".join(f"{v:.4f}" for v in q)
        else:
            q = [r["ppl_float"], r["ppl_torch_fakequant"], r["ort_none"]["ppl"], r["ort_all"]["ppl"]]
            quality = "ppl " + " / ".join(f"{v:.3f}" for v in q)
        out.append(f"| {r['model'].split(' (')[0]} | {r['recipe']} | {r['export_s']} | "
                   f"{kb(r['inline_bytes'])} | {kb(r['graph_only_bytes'])} + "
                   f"{kb(r['external_data_bytes'])} | {r['trt_check_errors']} errors | "
                   f"{r['ort_none']['max_abs']:.2e} / {r['ort_none']['rel_l2']:.2e} | "
                   f"{r['ort_all']['rel_l2']:.2e} | {quality} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=["w8a8", "int4_sym_g64"])
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the README table and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())["rows"]))
        return
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    done = lambda r: r["model"].startswith("SmolLM2") and r["recipe"] in args.recipes  # noqa
    rows = [r for r in rows if not done(r) and not (not args.skip_cnn and "CNN" in r["model"])]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cnn:
            rows.append(run_cnn(Path(tmp)))
            print(json.dumps(rows[-1], indent=1))
        for name in args.recipes:
            rows.append(run_llm(name, RECIPES[name], Path(tmp)))
            print(json.dumps(rows[-1], indent=1))
    meta = {"date": datetime.date.today().isoformat(), "machine": "cpu-2core",
            "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": __import__("onnxruntime").__version__}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
