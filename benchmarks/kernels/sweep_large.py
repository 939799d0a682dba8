"""One-call sweep for the large-M tensor-core path (M = 64, 256, 1024), all timed in one process
on one card: for each shape and M, the shipped dispatch, candidate configs of the fused kernel
(``w4a16_kernel``: token tiles BM up to 256, row tiles BN 64..256, 4 or 8 warps, 2..5 pipeline
stages, split-K), cuBLAS fp16, Humming, and the shipped dispatch again. Every candidate is
checked against the fp32 product before it is timed. --write-table puts a candidate into a
config table where it beats both timings of the shipped dispatch by more than --margin (with
--from: in this run and in the earlier one).

    python benchmarks/kernels/sweep_large.py --shapes 8192x28672,28672x8192 \\
        --out benchmarks/results/kernels_large_sweep_h100.json
    python benchmarks/kernels/sweep_large.py --from kernels_large_sweep_h100.json  # re-time winners
    python benchmarks/kernels/sweep_large.py --shipped-only --twin PAIRS=true   # A/B a setting
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import SHAPES, ours_fns, parse_shapes, problems  # noqa: E402
from common import (  # noqa: E402
    copy_bandwidth, graph_time_us, import_kernels, int4_floor_us, save_row, time_humming)
from sweep_v5 import shipped  # noqa: E402
import peers  # noqa: E402


def auto_split(tiles, k_tiles, num_sms=132):
    """Smallest power-of-two K split that gives every SM a program (at most k_tiles / 4)."""
    split = 1
    while tiles * split < num_sms and split * 2 <= max(1, k_tiles // 4):
        split *= 2
    return split


def candidates(m, n, k):
    """Fused-kernel configs for one (shape, M): (BM, BN, num_warps, num_stages) per M range,
    each with no split and with the split that fills the GPU."""
    if m <= 64:
        tiles = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 3),
                 (64, 128, 8, 4), (64, 256, 8, 3), (64, 128, 4, 5)]
    elif m <= 256:
        tiles = [(128, 128, 8, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3),
                 (256, 128, 8, 2), (256, 64, 4, 2), (128, 64, 4, 4)]
    else:
        tiles = [(256, 128, 8, 3), (256, 128, 8, 2), (128, 128, 8, 4), (128, 256, 8, 3),
                 (256, 64, 4, 2)]
    k_tiles = -(-k // 128)
    seen = []
    for bm, bn, nw, st in tiles:
        grid = -(-n // bn) * -(-m // bm)
        for sk in sorted({1, auto_split(grid, k_tiles)}):
            cfg = dict(BM=bm, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=st, FUSE_K=True,
                       GROUP_N=8)
            if cfg not in seen:
                seen.append(cfg)
    return seen


def pair_candidates(m, n, k, pairs=True):
    """v12: fused tiles with PAIRS on (v14: ``pairs`` = 2, transposed), each at several K splits
    (wave fill vs atomics)."""
    if m <= 64:
        tiles = [(64, 128, 8, 3), (64, 128, 8, 4), (64, 128, 8, 5), (64, 256, 8, 3),
                 (64, 256, 8, 4), (64, 64, 4, 4), (64, 64, 4, 5)]
        splits = (1, 2, 4, 8)
    elif m <= 256:
        tiles = [(256, 128, 8, 3), (128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4),
                 (256, 64, 4, 3)]
        splits = (1, 2, 3, 4)
    else:
        tiles = [(256, 128, 8, 3), (128, 256, 8, 3), (128, 256, 8, 4)]
        splits = (1, 2)
    k_tiles = -(-k // 128)
    return [dict(BM=bm, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=st, FUSE_K=True,
                 GROUP_N=8, PAIRS=pairs)
            for bm, bn, nw, st in tiles for sk in splits if sk <= max(1, k_tiles // 8)]


def time_cfg(mk, packed, x, nc, ref, cfg, reps):
    fns = ours_fns(mk, packed, x, nc, cfg)
    err = peers.check(fns[0](), ref)
    t = graph_time_us(fns, reps=reps)
    del fns
    return t, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="64,256,1024")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--out", default="large_sweep.json")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop trying candidates after")
    ap.add_argument("--reps", type=int, default=10, help="replays per candidate timing")
    ap.add_argument("--from", dest="prev", default=None,
                    help="an earlier sweep's JSON: time only its best candidate per row")
    ap.add_argument("--write-table", default=None)
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--twin", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also time each fused candidate with these settings (e.g. PAIRS=1); "
                         "repeat for several twins")
    ap.add_argument("--shipped-only", action="store_true",
                    help="candidates: the shipped config (the BM 256 fused tile where that "
                         "is dequant + cuBLAS) and its --twin; any M")
    ap.add_argument("--cands-table", default=None, metavar="JSON",
                    help="candidates: the row of this config table (e.g. another GPU's) for "
                         "each shape and M; with --write-table to a file that does not exist, "
                         "that file starts as this table with every row DEFAULT (heuristic)")
    ap.add_argument("--cands", default=None, metavar="JSON",
                    help="candidates: this JSON list of configs (every shape and M)")
    ap.add_argument("--pair-tiles", nargs="?", const=1, type=int, default=0, metavar="PAIRS",
                    help="candidates: v12's PAIRS tiles at several K splits (PAIRS 2: the "
                         "transposed words)")
    a = ap.parse_args()
    twins = [parse_twin(t) for t in a.twin or []]
    t0 = time.time()
    mk = import_kernels()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    prev, wins = {}, {}
    if a.prev:
        for r in json.loads(Path(a.prev).read_text())["rows"]:
            if r.get("best_cfg"):
                prev[(r["K"], r["N"], r["M"])] = [r["best_cfg"]]
                # the earlier run's own margin, so that a row is adopted only if it won twice
                wins[(r["K"], r["N"], r["M"])] = (
                    r["best_us"] < (1 - a.margin) * min(r["shipped_us"], r["shipped_us_2"]))
    rows = []
    shapes = parse_shapes(a.shapes)
    for k, n, m, w16, packed, nc, n16, x, ref in problems(
            mk, shapes, [int(v) for v in a.ms.split(",") if v]):
        row = {"K": k, "N": n, "M": m, "gpu": gpu, "date": date,
               "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2)}
        base = shipped(mk, m, n, k)
        t, err = time_cfg(mk, packed, x, nc, ref, base, 25)
        row.update(shipped_cfg=base, shipped_us=round(t, 2), shipped_err=err)
        if a.cands:
            cands = [dict(c) for c in json.loads(a.cands)]
        elif a.cands_table:
            cands = [c for c in [table_config(a.cands_table, m, n, k)] if c]
        elif a.shipped_only:
            cands = [base] if not base.get("DEQUANT") else [
                dict(BM=256, BN=128, SPLIT_K=1, num_warps=8, num_stages=3, FUSE_K=True,
                     GROUP_N=8)]
        else:
            cands = (prev.get((k, n, m)) if a.prev else
                     pair_candidates(m, n, k, True if a.pair_tiles == 1 else a.pair_tiles)
                     if a.pair_tiles else candidates(m, n, k))
        if twins:
            cands = [v for c in cands if not c.get("DEQUANT")
                     for v in [c] + [{**c, **t} for t in twins]]
        row["cands"] = []
        for cfg in cands or []:
            if time.time() - t0 > a.budget_s:
                print("budget spent: skipping the rest", flush=True)
                break
            if cfg == base and not a.shipped_only:
                continue
            try:
                t, err = time_cfg(mk, packed, x, nc, ref, cfg, a.reps)
            except Exception as e:  # noqa: BLE001 - a config that fails is reported
                print("fail", cfg, type(e).__name__, str(e)[:200], flush=True)
                row["cands"].append({"cfg": cfg, "fail": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            row["cands"].append({"cfg": cfg, "us": round(t, 2), "err": err})
        ok = [c for c in row["cands"] if c.get("us") and c["err"] < 3e-3]
        best = min(ok, key=lambda c: c["us"]) if ok else None
        if best:  # the winner again, with the full number of replays
            t, err = time_cfg(mk, packed, x, nc, ref, best["cfg"], 25)
            row.update(best_cfg=best["cfg"], best_us=round(t, 2), best_err=err)
        if not a.no_peers:
            row["cublas_us"] = round(graph_time_us(peers.cublas(w16, x, n16)), 2)
            time_humming(row, w16, x, nc)
        t, _ = time_cfg(mk, packed, x, nc, ref, base, 25)
        row["shipped_us_2"] = round(t, 2)
        save_row(rows, row, a.out, bw, hide=("cands",))
    if a.write_table:
        if a.cands_table and not Path(a.write_table).exists():
            start = json.loads(Path(a.cands_table).read_text())
            for key_rows in start.values():
                for row in key_rows:
                    row["config"], row["us"] = {"DEFAULT": True}, None
            Path(a.write_table).write_text(json.dumps(start, indent=1))
        write_table(a.write_table, [r for r in rows if wins.get((r["K"], r["N"], r["M"]), True)],
                    a.margin)
    print(f"{'K':>6} {'N':>6} {'M':>5} {'shipped':>8} {'again':>8} {'best':>8} {'cublas':>8} "
          f"{'humming':>8}  best cfg")
    for r in rows:
        c = r.get("best_cfg") or {}
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:5d} {r['shipped_us']:8.1f} "
              f"{r['shipped_us_2']:8.1f} {r.get('best_us') or 0:8.1f} "
              f"{r.get('cublas_us') or 0:8.1f} {r.get('humming_us') or 0:8.1f}  "
              f"BM{c.get('BM')} BN{c.get('BN')} w{c.get('num_warps')} st{c.get('num_stages')} "
              f"sk{c.get('SPLIT_K')}" + (f" WS st{c.get('STAGES')} p{c.get('PERSIST', 0)}"
                                        if c.get("WS") else ""))


def parse_twin(text: str) -> dict:
    """``"KEY=VALUE,KEY=VALUE"`` (JSON values) -> the config settings."""
    return dict((kv.partition("=")[0], json.loads(kv.partition("=")[2]))
                for kv in text.split(","))


def table_config(path, m, n, k):
    """The config a table file gives for (M, N, K), or None (no row, or a DEFAULT row)."""
    for row in json.loads(Path(path).read_text()).get(f"{n}x{k}", []):
        if m <= row["max_m"]:
            return None if row["config"].get("DEFAULT") else dict(row["config"])
    return None


def write_table(path, rows, margin):
    """Replace the row of each swept (shape, M) by the sweep's winner where it beats both timings
    of the shipped dispatch by more than ``margin`` (M = 64 -> max_m 64, 256 -> 256, 1024 -> the
    last row)."""
    table = json.loads(Path(path).read_text())
    for r in rows:
        key = f"{r['N']}x{r['K']}"
        ref = min(r["shipped_us"], r["shipped_us_2"])
        if not r.get("best_cfg") or r["best_us"] >= (1 - margin) * ref or key not in table:
            continue
        for row in table[key]:
            if row["max_m"] == r["M"] or (r["M"] > 256 and row["max_m"] >= 1 << 30):
                row["config"], row["us"] = r["best_cfg"], r["best_us"]
    Path(path).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
