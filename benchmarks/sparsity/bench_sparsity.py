"""2:4 sparsity accuracy: ours (magnitude, SparseGPT, SparseGPT + sparse fine-tune) vs nvidia-modelopt.

Every row uses the same calibration tokens (the Wikipedia calibration split, ``--n-samples``
windows of ``--seq-len`` tokens, seed 0) and the same test windows (first ``--windows`` x 2048
tokens of the test split). Rows are merged into ``benchmarks/results/sparsity.json`` keyed by
(model, method).

    python benchmarks/sparsity/bench_sparsity.py --model smollm2-135m
    python benchmarks/sparsity/bench_sparsity.py --model gemma3-270m --methods dense sparsegpt
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from modelopt_lite.calib.data import calib_tokens
from modelopt_lite.calib.embedded import load_model, wiki_text
from modelopt_lite.eval import perplexity

sys.path.insert(0, str(Path(__file__).parent))
from finetune import sparse_finetune  # noqa: E402

METHODS = ("dense", "magnitude", "sparsegpt", "modelopt_magnitude", "modelopt_sparsegpt",
           "sparsegpt_finetuned")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "sparsity.json"
CACHE = Path("/tmp/modelopt_lite_sparsity_bench")  # pruned checkpoints shared between rows
log = logging.getLogger("bench_sparsity")


def mtl_save(model, directory):
    import modelopt_lite as mtl

    mtl.save(model, directory)


def prune_ours(model, method, tokens):
    import modelopt_lite as mtl

    mtl.sparsify(model, "2:4", method=method, calib=tokens, progress=False)


def prune_modelopt(model, method, tokens):
    import modelopt.torch.sparsity as mts

    mode = {"modelopt_magnitude": "sparse_magnitude", "modelopt_sparsegpt": "sparsegpt"}[method]
    config = {"data_loader": [t.unsqueeze(0) for t in tokens], "collect_func": lambda b: b}
    if mode == "sparsegpt":
        config["device"] = "cpu"
    model = mts.sparsify(model, mode, config=config)
    model = model[0] if isinstance(model, tuple) else model
    return mts.export(model)


def run_one(args, method, tokens, base_ppl=None):
    model, tokenizer = load_model(args.model)
    start, cpu_start = time.perf_counter(), time.process_time()
    note = f"{args.n_samples}x{args.seq_len} tokens of the wiki calibration split (seed 0)"
    pruned_dir = CACHE / f"{args.model}-sparsegpt-{args.n_samples}x{args.seq_len}"
    saved_s = 0.0
    if method in ("magnitude", "sparsegpt"):
        prune_ours(model, method, tokens)
        if method == "sparsegpt":  # kept for the fine-tune row; the save is not calibration
            t = time.perf_counter()
            mtl_save(model, pruned_dir)
            saved_s = time.perf_counter() - t
    elif method.startswith("modelopt_"):
        model = prune_modelopt(model, method, tokens)
    elif method == "sparsegpt_finetuned":
        if (pruned_dir / "modelopt_lite.json").exists():  # the sparsegpt row's masks and weights
            import modelopt_lite as mtl

            mtl.load(model, pruned_dir)
            note += "; SparseGPT model reused from the sparsegpt row (its calib_s not included)"
        else:
            prune_ours(model, "sparsegpt", tokens)
        ft_tokens = calib_tokens([wiki_text("calibration")], tokenizer, args.ft_samples,
                                 args.ft_seq_len, seed=1)
        done = sparse_finetune(model, ft_tokens, seconds=args.ft_seconds, lr=args.ft_lr)
        note += (f"; then a mask-keeping fine-tune: {done['steps']} steps x {args.ft_seq_len} "
                 f"tokens of the calibration split (seed 1), lr {args.ft_lr}, "
                 f"{done['seconds']:.0f} s; calib_s includes it")
    calib_s = time.perf_counter() - start - saved_s
    cpu_s = time.process_time() - cpu_start
    if method in ("magnitude", "modelopt_magnitude"):
        note = "no data (weights only)"
    if method != "dense":
        note += f"; process CPU time {cpu_s:.0f} s, torch threads {torch.get_num_threads()}"
    res = perplexity(model, tokenizer, wiki_text("test"), windows=args.windows, progress=False)
    row = {"model": args.model, "method": method, "ppl": round(res.ppl, 3),
           "calib_s": None if method == "dense" else round(calib_s, 1),
           "eval_tokens": f"{res.tokens} ({res.windows} x {res.seq_len} test windows)",
           "calib": "-" if method == "dense" else note, "machine": args.machine,
           "date": datetime.date.today().isoformat()}
    log.info("%s", row)
    return row


def merge(rows, path=RESULTS):
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["model"], r["method"]) for r in rows}
    kept = [r for r in old if (r["model"], r["method"]) not in keys]
    order = {m: i for i, m in enumerate(METHODS)}
    out = sorted(kept + rows, key=lambda r: (r["model"], order.get(r["method"], 99)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ft-samples", type=int, default=256)
    p.add_argument("--ft-seconds", type=float, default=240)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-seq-len", type=int, default=256)
    p.add_argument("--machine", default="cpu-2core")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is fastest on a heavily shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _, tokenizer = load_model(args.model)
    tokens = calib_tokens([wiki_text("calibration")], tokenizer, args.n_samples, args.seq_len, seed=0)
    for method in args.methods:
        row = run_one(args, method, tokens)
        merge([row], args.out)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
