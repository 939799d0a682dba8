"""Sweep the CUDA-core decode kernel (GEMV=True) against the shipped tensor-core config and
Humming, for small M on the five Llama shapes. Prints one line per (shape, M); writes JSON.

    python benchmarks/kernels/gemv_sweep.py --ms 1,4,16 --out gemv_sweep.json
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import SHAPES, make_problem, ours_fns  # noqa: E402
from common import copies_for, copy_bandwidth, graph_time_us, import_kernels, int4_floor_us  # noqa: E402
import peers  # noqa: E402


def cands():
    for bn, sk, nw, pf in itertools.product((32, 64, 128), (2, 3, 4, 6, 8), (2, 4), (False, True)):
        yield dict(GEMV=True, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, PREFETCH=pf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--out", default="gemv_sweep.json")
    ap.add_argument("--peers", default="humming")
    ap.add_argument("--shapes", default=None, help="KxN,... (default: all five)")
    a = ap.parse_args()
    mk = import_kernels()
    bw = copy_bandwidth()
    rows = []
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES
    for k, n in shapes:
        w_hat, codes, scale, zero, packed = make_problem(mk, k, n)
        nc = copies_for(packed.qweight.numel() * 4)
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = mk.w4a16_reference(x, packed).float()
            base = graph_time_us(ours_fns(mk, packed, x, nc), reps=10)
            best = (float("inf"), None, None)
            for cfg in cands():
                try:
                    fns = ours_fns(mk, packed, x, nc, cfg)
                    err = ((fns[0]().float() - ref).norm() / ref.norm()).item()
                    t = graph_time_us(fns, reps=10)
                except Exception as e:  # noqa: BLE001
                    print("fail", cfg, str(e)[:300], flush=True)
                    continue
                if err < 2e-3 and t < best[0]:
                    best = (t, err, cfg)
            t = graph_time_us(ours_fns(mk, packed, x, nc, best[2]), reps=25)
            row = {"K": k, "N": n, "M": m, "shipped_us": round(base, 2), "gemv_us": round(t, 2),
                   "gemv_err": best[1], "gemv_cfg": best[2],
                   "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2),
                   "gpu": torch.cuda.get_device_name()}
            if "humming" in a.peers:
                try:
                    row["humming_us"] = round(graph_time_us(peers.humming(w_hat, 128, x, nc)), 2)
                except Exception as e:  # noqa: BLE001
                    row["humming_us"] = None
                    print("peer fail humming", str(e)[:200], flush=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
            Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
