"""One-call sweep for the MMA path with activations permuted once per call (``XPERM``), all
timed in one process on one card: for each shape and M, the shipped dispatch, the shipped config
with XPERM, a few XPERM tiles and splits around it, cuBLAS fp16 and Humming. --write-table puts
the XPERM winner into a config table where it beats the shipped config by more than --margin.

    python benchmarks/kernels/sweep_xperm.py --ms 8,16 --out xperm_sweep_h100.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, parse_shapes, problems  # noqa: E402
from common import (  # noqa: E402
    copy_bandwidth, graph_time_us, import_kernels, int4_floor_us, save_row, time_humming)
from sweep_v5 import best_of, shipped  # noqa: E402
import peers  # noqa: E402


def xperm_cands(base, k_tiles):
    """The shipped MMA config with XPERM, then other tiles at its split, then other splits."""
    out = [dict(base, XPERM=True)]
    for bn, nw in ((256, 8), (128, 4), (128, 8), (64, 4)):
        if (bn, nw) != (base["BN"], base["num_warps"]):
            out.append(dict(base, BN=bn, num_warps=nw, XPERM=True))
    for sk in (base["SPLIT_K"] // 2, base["SPLIT_K"] * 2):
        if 2 <= sk <= min(16, k_tiles):
            out.append(dict(base, SPLIT_K=sk, XPERM=True))
    out.append(dict(base, PREFETCH=not base.get("PREFETCH", False), XPERM=True))
    return out


def wide_cands(k_tiles):
    """Every MMA tile (2 or 4 rows per thread) x split 8/16 x prefetch, all with XPERM."""
    for bn, nw in ((32, 2), (64, 4), (128, 8), (64, 2), (128, 4), (256, 8)):
        for sk in (8, 16):
            for pf in (False, True):
                if sk <= k_tiles:
                    yield dict(MMA=True, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3,
                               PREFETCH=pf, OUT16=True, XPERM=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="8,16")
    ap.add_argument("--shapes", default="8192x28672,28672x8192,4096x4096,4096x14336,14336x4096")
    ap.add_argument("--out", default="xperm_sweep.json")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop trying candidates after")
    ap.add_argument("--write-table", default=None)
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--wide", action="store_true", help="every tile, split 8/16, prefetch")
    a = ap.parse_args()
    t0 = time.time()
    mk = import_kernels()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    shapes = parse_shapes(a.shapes)
    for k, n, m, w16, packed, nc, n16, x, ref in problems(
            mk, shapes, [int(v) for v in a.ms.split(",") if v]):
        row = {"K": k, "N": n, "M": m, "gpu": gpu,
               "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2)}
        base = shipped(mk, m, n, k)
        fns = ours_fns(mk, packed, x, nc, base)
        row["shipped_err"] = peers.check(fns[0](), ref)
        row["shipped_us"] = round(graph_time_us(fns), 2)
        row["shipped_cfg"] = base
        del fns
        cands = xperm_cands(base, -(-k // 128)) if base.get("MMA") else []
        if a.wide:
            cands = list(wide_cands(-(-k // 128)))
        if time.time() - t0 > a.budget_s:
            cands = cands[:1]
        t, err, cfg = best_of(mk, packed, x, nc, ref, cands)
        if cfg is not None:
            t = graph_time_us(ours_fns(mk, packed, x, nc, cfg))
        row.update(xperm_us=round(t, 2) if cfg else None, xperm_err=err, xperm_cfg=cfg)
        row["cublas_us"] = round(graph_time_us(peers.cublas(w16, x, n16)), 2)
        time_humming(row, w16, x, nc)
        if cfg is not None:  # the shipped config again, after the candidates
            row["shipped_us_2"] = round(graph_time_us(ours_fns(mk, packed, x, nc, base)), 2)
        save_row(rows, row, a.out, bw)
    if a.write_table:
        write_table(a.write_table, rows, a.margin)
    print(f"{'K':>6} {'N':>6} {'M':>4} {'shipped':>8} {'again':>8} {'xperm':>8} {'cublas':>8} "
          f"{'humming':>8}  xperm cfg")
    for r in rows:
        c = r["xperm_cfg"] or {}
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:4d} {r['shipped_us']:8.1f} "
              f"{r.get('shipped_us_2') or 0:8.1f} {r['xperm_us'] or 0:8.1f} "
              f"{r['cublas_us']:8.1f} {r.get('humming_us') or 0:8.1f}  BN{c.get('BN')} "
              f"w{c.get('num_warps')} sk{c.get('SPLIT_K')} pf{int(bool(c.get('PREFETCH')))}")


def write_table(path, rows, margin):
    """Replace the row max_m = M of each swept shape by the XPERM winner where it beats the
    shipped config (both timings of it) by more than ``margin``."""
    table = json.loads(Path(path).read_text())
    for r in rows:
        key = f"{r['N']}x{r['K']}"
        ref = min(r["shipped_us"], r.get("shipped_us_2") or r["shipped_us"])
        if r["xperm_cfg"] is None or r["xperm_us"] >= (1 - margin) * ref or key not in table:
            continue
        for row in table[key]:
            if row["max_m"] == r["M"]:
                row["config"], row["us"] = r["xperm_cfg"], r["xperm_us"]
    Path(path).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
