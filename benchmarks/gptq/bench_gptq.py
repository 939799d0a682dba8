"""GPTQ rounding time on the GPU: the PyTorch column loop vs the Triton column loop
(``kernels/gptq.py``), on the linears of a Llama-3-8B decoder layer as AWQ rounds them (the
linears sharing an input stacked: q/k/v, o, gate/up, down), INT4 block 128, symmetric.

Rows go to ``benchmarks/results/gptq_speed.json`` (or ``--out``): ``{"shape", "loop_s",
"kernel_s", "speedup", "codes_equal", "gpu", "date"}``, medians of ``--reps`` runs.

    python benchmarks/gptq/bench_gptq.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

import modelopt_lite.algorithms.gptq as G
from modelopt_lite.algorithms.awq_search import weight_range
from modelopt_lite.config import QuantizerSpec

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gptq_speed.json"
# (rows stacked, inputs): Llama-3-8B q/k/v (4096 + 1024 + 1024), o, gate/up, down
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def timed(fn, reps):
    out, times = None, []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=128, symmetric=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        x = torch.randn(4096, in_f, device="cuda", generator=g)
        w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
        h = 2 * x.t() @ x / x.shape[0]
        amin, amax = weight_range(w, spec)
        run = lambda: G.gptq_round(w, h, spec, amin, amax)  # noqa: E731
        os.environ["MODELOPT_LITE_GPTQ_KERNEL"] = "0"   # the PyTorch loop
        loop, loop_s = timed(run, a.reps)
        os.environ["MODELOPT_LITE_GPTQ_KERNEL"] = "1"
        fused, kernel_s = timed(run, a.reps)
        row = {"shape": f"{out_f}x{in_f}", "loop_s": round(loop_s, 3),
               "kernel_s": round(kernel_s, 3), "speedup": round(loop_s / kernel_s, 1),
               "codes_equal": round((fused == loop).float().mean().item(), 6),
               "gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
