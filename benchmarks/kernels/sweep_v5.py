"""One-call sweep for the v5 changes, all timed in one process on one card:

* decode (M <= 16): the GEMV kernel over (BN, num_warps, SPLIT_K, PREFETCH, OUT16), with the
  grid's split axis fastest (K_FAST) and slowest, against the shipped config (or a saved
  table's, --base-table), cuBLAS fp16 and Humming; --write-table puts the best M = 1 configs
  into a config table;
* large M: dequantize-then-cuBLAS (``DEQUANT``) over the dequant kernel's tile against the
  shipped config and cuBLAS fp16, plus the dequant kernel alone.

    python benchmarks/kernels/sweep_v5.py --ms 1 --big "" --write-table kernels/configs/h100.json \
        --out benchmarks/results/gemv_sweep_h100.json
    python benchmarks/kernels/sweep_v5.py --ms "" --big 256,512,1024 --peers cublas
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import SHAPES, make_problem, ours_fns  # noqa: E402
from common import (  # noqa: E402
    copies_for, copy_bandwidth, graph_time_us, import_kernels, int4_floor_us, save_row,
    time_humming)
import peers  # noqa: E402


GEMV_TILES = ((32, 4), (64, 8), (64, 4), (128, 8), (32, 2), (64, 2), (128, 4), (256, 8))


def gemv_cands(m, k_fast=True):
    """(BN, num_warps) sets the rows per thread: BN / (8 num_warps) = 1, 2 or 4."""
    tiles = ((64, 4), (128, 8), (32, 2), (128, 4)) if m == 1 else ((64, 4), (128, 8), (32, 4))
    for (bn, nw), sk, pf in itertools.product(tiles, (4, 8, 16), (1, 2)):
        for o16 in ((False, True) if sk > 1 else (False,)):
            yield dict(GEMV=True, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, OUT16=o16,
                       PREFETCH=pf, K_FAST=k_fast)


def dq_cands():
    for bn, ch, nw in ((32, 4, 4), (64, 4, 4), (64, 16, 4), (128, 8, 8), (64, 8, 4)):
        yield dict(DEQUANT=True, DQ_BN=bn, DQ_CHUNKS=ch, DQ_WARPS=nw)


def shipped(mk, m, n, k, base=None):
    if base:  # a saved table, e.g. the configs before a change
        return next(dict(r["config"]) for r in base[f"{n}x{k}"] if m <= r["max_m"])
    return importlib_tuning(mk).pick_config(m, n, k, 128, torch.device("cuda"))


def importlib_tuning(mk):
    import importlib

    return importlib.import_module(mk.__name__ + ".tuning")


def best_of(mk, packed, x, nc, ref, cands, reps=10):
    best = (float("inf"), None, None)
    for cfg in cands:
        try:
            fns = ours_fns(mk, packed, x, nc, cfg)
            err = peers.check(fns[0](), ref)
            t = graph_time_us(fns, reps=reps)
        except Exception as e:  # noqa: BLE001
            print("fail", cfg, type(e).__name__, str(e)[:300], flush=True)
            continue
        if err < 3e-3 and t < best[0]:
            best = (t, err, cfg)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--big", default="256,512,1024")
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--out", default="sweep_v5.json")
    ap.add_argument("--peers", default="cublas,humming")
    ap.add_argument("--base-table", default=None, help="config table JSON for the baseline")
    ap.add_argument("--write-table", default=None,
                    help="replace the M = 1 rows of this table with the best GEMV configs")
    a = ap.parse_args()
    base = json.loads(Path(a.base_table).read_text()) if a.base_table else None
    mk = import_kernels()
    ops = __import__(mk.__name__ + ".ops", fromlist=["dequantize_fp"])
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES
    rows = []
    for k, n in shapes:
        w16, codes, scale, zero, packed = make_problem(mk, k, n)
        nc = copies_for(packed.qweight.numel() * 4)
        n16 = copies_for(w16.numel() * 2)
        for m in [int(v) for v in a.ms.split(",") if v] + [int(v) for v in a.big.split(",") if v]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ w16.float().t()
            row = {"K": k, "N": n, "M": m, "gpu": gpu,
                   "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2)}
            base_cfg = shipped(mk, m, n, k, base)
            fns = ours_fns(mk, packed, x, nc, base_cfg)
            row["shipped_err"] = peers.check(fns[0](), ref)
            row["shipped_us"] = round(graph_time_us(fns), 2)
            row["shipped_cfg"] = base_cfg
            if m <= 16:  # grid with the split slowest (as before) and fastest
                t0, _, cfg0 = best_of(mk, packed, x, nc, ref, gemv_cands(m, False))
                t, err, cfg = best_of(mk, packed, x, nc, ref, gemv_cands(m, True))
                if cfg0 is not None:
                    row["k_slow_us"] = round(graph_time_us(ours_fns(mk, packed, x, nc, cfg0)), 2)
                    row["k_slow_cfg"] = cfg0
                if cfg is not None:
                    t = graph_time_us(ours_fns(mk, packed, x, nc, cfg))
                if cfg0 is not None and row["k_slow_us"] < t:
                    t, cfg = row["k_slow_us"], cfg0
                row.update(new_us=round(t, 2), new_err=err, new_cfg=cfg)
            else:
                t, err, cfg = best_of(mk, packed, x, nc, ref, dq_cands())
                if cfg is not None:
                    t = graph_time_us(ours_fns(mk, packed, x, nc, cfg))
                    copies = [packed._replace(qweight=packed.qweight.clone()) for _ in range(nc)]
                    row["dequant_only_us"] = round(graph_time_us(
                        [lambda p=p: ops.dequantize_fp(p, torch.float16, cfg) for p in copies]), 2)
                    del copies
                row.update(new_us=round(t, 2), new_err=err, new_cfg=cfg)
            if "cublas" in a.peers:
                row["cublas_us"] = round(graph_time_us(peers.cublas(w16, x, n16)), 2)
            if "humming" in a.peers and m in (1, 4, 16):
                time_humming(row, w16, x, nc)
            save_row(rows, row, a.out, bw)
    if a.write_table:
        table = json.loads(Path(a.write_table).read_text())
        for r in rows:
            key = f"{r['N']}x{r['K']}"
            if r["M"] == 1 and r["new_cfg"] and key in table and table[key][0]["max_m"] == 1:
                table[key][0] = {"max_m": 1, "config": r["new_cfg"], "us": r["new_us"]}
        Path(a.write_table).write_text(json.dumps(table, indent=1))
    print(f"{'K':>6} {'N':>6} {'M':>5} {'shipped':>8} {'new':>8} {'cublas':>8} {'humming':>8} "
          f"{'dq':>7}")
    for r in rows:
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:5d} {r['shipped_us']:8.1f} {r['new_us']:8.1f} "
              f"{r.get('cublas_us') or 0:8.1f} {r.get('humming_us') or 0:8.1f} "
              f"{r.get('dequant_only_us') or 0:7.1f} {r['new_cfg']}")


if __name__ == "__main__":
    main()
