"""One-call sweep of the small-M load and dequantization options, all timed in one process on one
card: per shape and M the shipped dispatch (timed before and after the candidates), the best
candidate and Humming. Options swept: ``PIPE`` (word loads through the software pipeliner),
``FS`` (scales in float32 after the MMAs), ``SV`` (scales of 2 / 4 chunks per load), word-load
hints (``--qload``: cg = L2 only, ef = L1 evict-first), XPERM, tiles and split-K; MMA kernel
for M >= 1, and the GEMV at M = 1 unless --no-gemv. ``--from`` re-times the winners of an
earlier sweep; ``--write-table`` puts winners that beat both shipped timings by --margin into
a config table (NOTES.md, v10).

    python benchmarks/kernels/sweep_pipe.py --shapes 8192x28672,28672x8192 --ms 1,4,16 \
        --out pipe_sweep_h100.json
    python benchmarks/kernels/sweep_pipe.py --ms 1,4 --fs 0,2 --sv 2,4 --pipes 0 --qload ef \
        --xperm 0,1 --splits 8,14,16,28 --no-gemv --out small_sweep.json
    python benchmarks/kernels/sweep_pipe.py --ms 1,4 --from small_sweep.json \
        --write-table kernels/configs/h100.json --write-ms 1,4 --out small_confirm.json

With ``--from``, ``--write-table`` adopts a winner only if it also beat both shipped timings by
--margin in the earlier run. ``--compile-only --part i/n`` runs every n-th candidate once (no
timing) to fill Triton's disk cache; several such processes at once compile in parallel before
the timed sweep (v11).
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

TILES = ((32, 2), (64, 4), (64, 2), (128, 4), (128, 8), (256, 8))   # 2 or 4 rows per thread


QLOAD = {"-": {}, "cg": dict(QC=".cg"), "ef": dict(QE="evict_first")}


def pipe_cands(m, k_tiles, pipes, splits, fss=(0,), gemv=True, tiles=TILES, qls=("-",),
               xps=None, svs=(1,)):
    """MMA candidates (tiles x split x PIPE x FS, XPERM both ways above 8 tokens) and, at
    M = 1 with ``gemv``, pipelined GEMV candidates. PIPE 0 = plain loads; FS 0 = half-precision
    dequantization, 1 / 2 = scales in float32 after the products (:func:`mma_fs_asm`); word
    loads plain ("-"), L2-only ("cg": cache_modifier .cg) or L1 evict-first ("ef")."""
    xps = xps or ((False, True) if m > 8 else (False,))
    for (bn, nw), sk, pp, fs, xp, ql, sv in itertools.product(tiles, splits, pipes, fss, xps,
                                                              qls, svs):
        if sk <= k_tiles and (sv == 1 or pp == 0) and -(-k_tiles // sk) % sv == 0:
            yield dict(MMA=True, BN=bn, SPLIT_K=sk, num_warps=nw, PIPE=pp, PREFETCH=False,
                       OUT16=sk > 1, XPERM=xp, FS=fs, SV=sv, **QLOAD[ql])
    if m == 1 and gemv:
        for (bn, nw), sk, pp, ql in itertools.product(((32, 2), (64, 4), (64, 2), (128, 4)),
                                                      splits, pipes, qls):
            if sk <= k_tiles:
                yield dict(GEMV=True, BN=bn, SPLIT_K=sk, num_warps=nw, PIPE=pp, PREFETCH=False,
                           OUT16=False, K_FAST=True, **QLOAD[ql])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default="8192x28672,28672x8192")
    ap.add_argument("--pipes", default="3,4,6")
    ap.add_argument("--splits", default="4,8,16")
    ap.add_argument("--out", default="pipe_sweep.json")
    ap.add_argument("--from", dest="src", default=None,
                    help="re-time only each row's winner from an earlier sweep's JSON")
    ap.add_argument("--peers", default="humming")
    ap.add_argument("--fs", default="0", help="FS values to sweep (0, 1, 2)")
    ap.add_argument("--no-gemv", action="store_true", help="no GEMV candidates at M = 1")
    ap.add_argument("--qload", default="-", help="word-load kinds to sweep: -, cg, ef")
    ap.add_argument("--tiles", default="", help="BN/warps,... (default: all six)")
    ap.add_argument("--xperm", default="", help="0,1: XPERM values above 8 tokens")
    ap.add_argument("--sv", default="1", help="SV values (chunks per scale load: 1, 2, 4)")
    ap.add_argument("--write-table", default=None,
                    help="put winners into this config table (rows max_m = M, --write-ms only)")
    ap.add_argument("--write-ms", default="16")
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--part", default="0/1", help="i/n: this process takes candidates i::n")
    ap.add_argument("--compile-only", action="store_true",
                    help="run each candidate once, untimed (fills the kernel cache)")
    a = ap.parse_args()
    part, nparts = map(int, a.part.split("/"))
    mk = import_kernels()
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {bw / 1e12:.3f} TB/s", flush=True)
    prev, prev_rows = {}, {}
    if a.src:
        for r in json.loads(Path(a.src).read_text())["rows"]:
            prev[(r["K"], r["N"], r["M"])] = r["pipe_cfg"]
            prev_rows[(r["K"], r["N"], r["M"])] = r
    pipes = [int(v) for v in a.pipes.split(",") if v]
    splits = [int(v) for v in a.splits.split(",") if v]
    rows = []
    for k, n, m, w16, packed, nc, n16, x, ref in problems(
            mk, parse_shapes(a.shapes), [int(v) for v in a.ms.split(",") if v]):
        if a.compile_only:
            cands = [shipped(mk, m, n, k)] + list(pipe_cands(
                m, -(-k // 128), pipes, splits, [int(v) for v in a.fs.split(",")],
                not a.no_gemv, parse_tiles(a.tiles), a.qload.split(","), parse_xperm(a.xperm),
                [int(v) for v in a.sv.split(",")]))
            # one per compiled kernel: SPLIT_K is a run-time argument (never 1 here)
            uniq = {tuple(sorted((kk, str(v)) for kk, v in c.items() if kk != "SPLIT_K")): c
                    for c in cands}
            compile_cands(mk, packed, x, list(uniq.values())[part::nparts])
            continue
        row = {"K": k, "N": n, "M": m, "gpu": gpu,
               "floor_us": round(int4_floor_us(m, n, k, 128, bw), 2)}
        base_cfg = shipped(mk, m, n, k)
        fns = ours_fns(mk, packed, x, nc, base_cfg)
        row["shipped_err"] = peers.check(fns[0](), ref)
        row["shipped_us"] = round(graph_time_us(fns), 2)
        row["shipped_cfg"] = base_cfg
        if a.src:
            cands = [prev[(k, n, m)]] if prev.get((k, n, m)) else []
        else:
            cands = list(pipe_cands(m, -(-k // 128), pipes, splits,
                                    [int(v) for v in a.fs.split(",")], not a.no_gemv,
                                    parse_tiles(a.tiles), a.qload.split(","),
                                    parse_xperm(a.xperm), [int(v) for v in a.sv.split(",")]))
        t, err, cfg = best_of(mk, packed, x, nc, ref, cands)
        if cfg is not None:
            t = graph_time_us(ours_fns(mk, packed, x, nc, cfg))
        row.update(pipe_us=round(t, 2), pipe_err=err, pipe_cfg=cfg)
        row["shipped_again_us"] = round(graph_time_us(fns), 2)
        del fns
        if "humming" in a.peers:
            time_humming(row, w16, x, nc)
        save_row(rows, row, a.out, bw)
    if a.compile_only:
        return
    if a.write_table:
        write_table(a.write_table, rows, [int(v) for v in a.write_ms.split(",")], a.margin,
                    prev_rows if a.src else None)
    print(f"{'K':>6} {'N':>6} {'M':>4} {'shipped':>8} {'again':>8} {'pipe':>8} {'humming':>8} "
          f"{'floor':>7}  pipe cfg")
    for r in rows:
        c = r["pipe_cfg"] or {}
        kind = "gemv" if c.get("GEMV") else "mma"
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:4d} {r['shipped_us']:8.1f} "
              f"{r['shipped_again_us']:8.1f} {r['pipe_us']:8.1f} {r.get('humming_us') or 0:8.1f} "
              f"{r['floor_us']:7.1f}  {kind} BN{c.get('BN')} w{c.get('num_warps')} "
              f"sk{c.get('SPLIT_K')} pipe{c.get('PIPE')} xp{int(bool(c.get('XPERM')))} "
              f"fs{c.get('FS', 0)} sv{c.get('SV', 1)} q{c.get('QC', '')}{c.get('QE', '')} "
              f"err {r['pipe_err'] or 0:.1e}/{r['shipped_err']:.1e}")


def parse_tiles(text):
    return tuple(tuple(map(int, t.split("/"))) for t in text.split(",")) if text else TILES


def parse_xperm(text):
    return tuple(bool(int(v)) for v in text.split(",")) if text else None


def compile_cands(mk, packed, x, cands):
    """Run each candidate once on one weight copy (compiles it into the disk cache)."""
    for cfg in cands:
        try:
            mk.w4a16_matmul(x, packed, None, cfg)
        except Exception as e:  # noqa: BLE001
            print("fail", cfg, type(e).__name__, str(e)[:200], flush=True)
    torch.cuda.synchronize()


def _won(r, margin):
    ref = min(r["shipped_us"], r["shipped_again_us"])
    return r["pipe_cfg"] is not None and r["pipe_us"] < (1 - margin) * ref


def write_table(path, rows, ms, margin, prev=None):
    """Replace the config of row max_m = M (M in ``ms``) where the winner beats both timings of
    the shipped config by more than ``margin`` (and, with ``prev``, the earlier run's rows, did
    so there too)."""
    table = json.loads(Path(path).read_text())
    for r in rows:
        key = f"{r['N']}x{r['K']}"
        if r["M"] not in ms or key not in table or r["pipe_cfg"] is None:
            continue
        ref = min(r["shipped_us"], r["shipped_again_us"])
        p = prev.get((r["K"], r["N"], r["M"])) if prev is not None else None
        if prev is not None and not (p and _won(p, margin)):
            print(f"table {key} max_m {r['M']}: run 1 did not win by {margin:.0%}, kept",
                  flush=True)
            continue
        if r["pipe_us"] < (1 - margin) * ref:
            for row in table[key]:
                if row["max_m"] == r["M"]:
                    row["config"] = {kk: v for kk, v in r["pipe_cfg"].items()
                                     if v not in (0, "", None) or kk in ("PREFETCH",)}
                    row["us"] = r["pipe_us"]
                    print(f"table {key} max_m {r['M']}: {ref} -> {r['pipe_us']} us", flush=True)
    Path(path).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
