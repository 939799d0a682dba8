"""One-call sweep for the small-M tensor-core GEMV (``MMA`` configs), all timed in one process
on one card: for each shape and M, the shipped dispatch (or a saved table's, --base-table),
the best MMA config, cuBLAS fp16 and Humming. --write-table puts the MMA winners into a
config table where they beat the shipped config by more than --margin.

    python benchmarks/kernels/sweep_mma.py --ms 1,2,4,8,16,64 --out mma_sweep_h100.json \
        --write-table kernels/configs/h100.json
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, parse_shapes, problems  # noqa: E402
from common import (  # noqa: E402
    copy_bandwidth, graph_time_us, import_kernels, int4_floor_us, save_row, time_humming)
from sweep_v5 import best_of, shipped  # noqa: E402
import peers  # noqa: E402

TILES = ((32, 2), (64, 4), (128, 8), (64, 2), (128, 4), (256, 8))   # 2 or 4 rows per thread


def mma_cands(m, k_tiles):
    splits = (1, 2, 4) if m > 16 else (4, 8, 16)
    for (bn, nw), sk, pf in itertools.product(TILES, splits, (False, True)):
        if sk <= k_tiles:
            yield dict(MMA=True, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, PREFETCH=pf,
                       OUT16=sk > 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--shapes", default="8192x28672,28672x8192,4096x4096,4096x14336,14336x4096")
    ap.add_argument("--out", default="mma_sweep.json")
    ap.add_argument("--peers", default="cublas,humming")
    ap.add_argument("--base-table", default=None)
    ap.add_argument("--write-table", default=None)
    ap.add_argument("--margin", type=float, default=0.03)
    a = ap.parse_args()
    base = json.loads(Path(a.base_table).read_text()) if a.base_table else None
    mk = import_kernels()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    shapes = parse_shapes(a.shapes or "")
    rows = []
    for k, n, m, w16, packed, nc, n16, x, ref in problems(
            mk, shapes, [int(v) for v in a.ms.split(",") if v]):
        row = {"K": k, "N": n, "M": m, "gpu": gpu,
               "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2)}
        base_cfg = shipped(mk, m, n, k, base)
        fns = ours_fns(mk, packed, x, nc, base_cfg)
        row["shipped_err"] = peers.check(fns[0](), ref)
        row["shipped_us"] = round(graph_time_us(fns), 2)
        row["shipped_cfg"] = base_cfg
        del fns
        cands = list(mma_cands(m, -(-k // 128)))
        if m == 1:  # for reference only: the GEMV stays at M = 1
            cands = [c for c in cands if c["SPLIT_K"] in (8, 16) and c["PREFETCH"]]
        t, err, cfg = best_of(mk, packed, x, nc, ref, cands)
        if cfg is not None and cfg["SPLIT_K"] > 1:  # the float32 buffer instead of OUT16
            t2, err2, cfg2 = best_of(mk, packed, x, nc, ref, [dict(cfg, OUT16=False)])
            if cfg2 is not None and t2 < t:
                t, err, cfg = t2, err2, cfg2
        if cfg is not None:
            t = graph_time_us(ours_fns(mk, packed, x, nc, cfg))
        row.update(mma_us=round(t, 2), mma_err=err, mma_cfg=cfg)
        if "cublas" in a.peers:
            row["cublas_us"] = round(graph_time_us(peers.cublas(w16, x, n16)), 2)
        if "humming" in a.peers:
            time_humming(row, w16, x, nc)
        save_row(rows, row, a.out, bw)
    if a.write_table:
        write_table(a.write_table, rows, a.margin)
    print(f"{'K':>6} {'N':>6} {'M':>4} {'shipped':>8} {'mma':>8} {'cublas':>8} {'humming':>8} "
          f"{'floor':>7}  mma cfg")
    for r in rows:
        c = r["mma_cfg"] or {}
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:4d} {r['shipped_us']:8.1f} {r['mma_us']:8.1f} "
              f"{r.get('cublas_us') or 0:8.1f} {r.get('humming_us') or 0:8.1f} {r['floor_us']:7.1f}"
              f"  BN{c.get('BN')} w{c.get('num_warps')} sk{c.get('SPLIT_K')} "
              f"pf{int(bool(c.get('PREFETCH')))} o16{int(bool(c.get('OUT16')))}")


def write_table(path, rows, margin):
    """Rows max_m = M for every swept M: the MMA config where it beats the shipped one by more
    than ``margin``, else the shipped config; rows above the largest swept M are kept."""
    table = json.loads(Path(path).read_text())
    for key in {f"{r['N']}x{r['K']}" for r in rows}:
        if key not in table:
            continue
        swept = sorted((r for r in rows if f"{r['N']}x{r['K']}" == key), key=lambda r: r["M"])
        top = swept[-1]["M"]
        old = table[key]
        new = [r for r in old if r["max_m"] < swept[0]["M"]]
        for r in swept:
            win = r["mma_cfg"] is not None and r["mma_us"] < (1 - margin) * r["shipped_us"]
            cfg = r["mma_cfg"] if win else r["shipped_cfg"]
            new.append({"max_m": r["M"], "config": cfg,
                        "us": r["mma_us"] if win else r["shipped_us"]})
        new += [r for r in old if r["max_m"] > top]
        table[key] = new
    Path(path).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
