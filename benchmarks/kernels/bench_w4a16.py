"""W4A16 kernel benchmark: ours vs cuBLAS fp16, tinygemm, GemLite and Humming on Llama shapes.

Each kernel is replayed in a CUDA graph over enough weight copies to stream > 4x L2 from
memory; the time per layer is the median over 25 replays. The floor is the bytes that must
move (int4 weights, fp16 scales and zeros, activations, output) over the measured copy
bandwidth. Usage:

    python benchmarks/kernels/bench_w4a16.py --peers cublas,tinygemm,gemlite,humming \
        --out benchmarks/results/kernels_h100.json
    python benchmarks/kernels/bench_w4a16.py --tune kernels/configs/h100.json   # retune ours
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import copies_for, copy_bandwidth, graph_time_us, import_kernels, int4_floor_us  # noqa: E402
import peers  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]  # (K, N)
MS = [1, 4, 16, 64, 256, 1024]
GROUP = 128


def small_m_candidates(m):
    fuse = (False, True) if m > 4 else (False,)  # one 128-deep product per chunk (v3)
    for bn, sk, fk in itertools.product((64, 128), (1, 2, 4, 8), fuse):
        yield dict(BM=16, BN=bn, SPLIT_K=sk, num_warps=4, num_stages=3, FUSE_K=fk)
    yield dict(BM=16, BN=64, SPLIT_K=4, num_warps=2, num_stages=3, FUSE_K=m > 4)


def large_m_candidates(m):
    if m <= 64:
        for bn, nw in ((64, 4), (128, 8), (128, 4)):
            for sk in (1, 2):
                yield dict(BM=64, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, FUSE_K=True)
    else:
        for st in (3, 4):
            yield dict(BM=128, BN=128, SPLIT_K=1, num_warps=8, num_stages=st, FUSE_K=True)
            yield dict(BM=128, BN=64, SPLIT_K=1, num_warps=4, num_stages=st, FUSE_K=True)
        # dequantize once to fp16, then cuBLAS
        for bn, ch in ((32, 4), (64, 16)):
            yield dict(DEQUANT=True, DQ_BN=bn, DQ_CHUNKS=ch, DQ_WARPS=4)


def gemv_candidates():
    """The CUDA-core decode kernel: BN / (8 num_warps) rows per thread (1, 2 or 4)."""
    for (bn, nw), sk, pf, o16 in itertools.product(
            ((64, 4), (128, 8), (32, 2), (64, 2), (128, 4)), (2, 4, 8, 16), (False, True, 2),
            (False, True)):
        yield dict(GEMV=True, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, PREFETCH=pf,
                   OUT16=o16)


ENV_WORDS = "MODELOPT_LITE_BENCH_WORDS"


def make_problem(mk, k, n, group=GROUP, seed=0, integer_zero=False, symmetric=False):
    """Random weights [N, K] quantized asymmetric: float zero points (this toolkit's min/max
    quantizers; the kernels read a 16-bit zero term) or, ``integer_zero``, rounded ones (as
    AutoAWQ / GPTQ / Humming store them; the warp-specialized kernel reads 4 bits); or
    ``symmetric`` (no zero points). The words are laid out tile by tile as ``deploy`` stores
    them (``PackedInt4.tiled``); ``MODELOPT_LITE_BENCH_WORDS=rows`` keeps them row by row (then
    the tables' TILED configs read a tile-by-tile copy unless ``MODELOPT_LITE_TILED=0``)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    codes, scale, zero = importlib.import_module(mk.__name__ + ".packing").quantize_rtn(
        w, group, symmetric=symmetric, integer_zero=integer_zero)
    packed = mk.pack_weight(codes, scale, zero, group, torch.float16)
    if os.environ.get(ENV_WORDS, "tiled") != "rows":   # deploy's layout, as Int4Linear holds it
        packed = packed.tiled()
    w_hat = mk.dequantize(packed, torch.float16)
    return w_hat, codes, scale, zero, packed


def problems(mk, shapes, ms, integer_zero=False, symmetric=False):
    """Each (K, N) x M of a sweep as ``(k, n, m, w16, packed, nc, n16, x, ref)``: the weights
    made once per shape, the rotating-copy counts for the packed and the fp16 weights, a fresh
    activation and its fp32 product with the dequantized weights."""
    for k, n in shapes:
        w16, _, _, _, packed = make_problem(mk, k, n, integer_zero=integer_zero,
                                            symmetric=symmetric)
        nc, n16 = copies_for(packed.qweight.numel() * 4), copies_for(w16.numel() * 2)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            yield k, n, m, w16, packed, nc, n16, x, x.float() @ w16.float().t()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"KxN,KxN"`` -> [(K, N), ...] (empty -> the five Llama shapes)."""
    return [tuple(map(int, s.split("x"))) for s in text.split(",") if s] or list(SHAPES)


def ours_fns(mk, packed, x, n_copies, cfg=None):
    copies = [packed._replace(qweight=packed.qweight.clone(), scale=packed.scale.clone(),
                              zterm=None if packed.zterm is None else packed.zterm.clone())
              for _ in range(n_copies)]
    return [lambda p=p: mk.w4a16_matmul(x, p, None, cfg) for p in copies]


def tune(mk, out_path, shapes, ms, budget_s):
    table, t0 = {}, time.time()
    for k, n in shapes:
        _, _, _, _, packed = make_problem(mk, k, n)
        n_copies = copies_for(packed.qweight.numel() * 4)
        rows = []
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cands = list(small_m_candidates(m) if m <= 16 else large_m_candidates(m))
            if m == 1:  # the CUDA-core decode kernel
                cands += list(gemv_candidates())
            best = (float("inf"), None)
            for cfg in cands:
                if time.time() - t0 > budget_s:
                    break
                try:
                    t = graph_time_us(ours_fns(mk, packed, x, n_copies, cfg), reps=10)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                    print("skip", cfg, type(e).__name__, str(e)[:120], flush=True)
                    continue
                best = min(best, (t, cfg), key=lambda b: b[0])
            print(f"tune K={k} N={n} M={m}: {best[0]:.1f} us {best[1]}", flush=True)
            if best[1] is not None:
                rows.append({"max_m": m, "config": best[1], "us": round(best[0], 2)})
        if rows:
            rows[-1]["max_m"] = 1 << 30
            table[f"{n}x{k}"] = rows
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(table, indent=1))
    return table


def _settle(seconds):
    """Idle before a timing, so that no kernel is timed while the clocks recover from the
    previous (large-M) measurement."""
    if seconds > 0:
        torch.cuda.synchronize()
        time.sleep(seconds)


def bench(mk, shapes, ms, peer_names, gpu, bw, out=None, settle=0.0, integer_zero=False):
    rows = []
    date = datetime.date.today().isoformat()
    for k, n in shapes:
        w16, codes, scale, zero, packed = make_problem(mk, k, n, integer_zero=integer_zero)
        n4 = copies_for(packed.qweight.numel() * 4)
        n16 = copies_for(w16.numel() * 2)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ w16.float().t()
            row = {"K": k, "N": n, "M": m, "gpu": gpu, "date": date, "settle_s": settle,
                   "zeros": "integer" if integer_zero else "float",
                   "floor_us": round(int4_floor_us(m, n, k, GROUP, bw,
                                                   4 if integer_zero else 16), 2)}
            fns = ours_fns(mk, packed, x, n4)
            row["ours_err"] = peers.check(fns[0](), ref)
            _settle(settle)
            row["ours_us"] = round(graph_time_us(fns), 2)
            builders = {
                "cublas": lambda: peers.cublas(w16, x, n16),
                "tinygemm": lambda: peers.tinygemm(codes, scale, zero, GROUP, x, n4),
                "gemlite": lambda: peers.gemlite(codes, scale, zero, GROUP, x, n4),
                "humming": lambda: peers.humming(w16, GROUP, x, n4),
            }
            for name in ("cublas", "tinygemm", "gemlite", "humming"):
                row[f"{name}_us"] = None
                if name not in peer_names:
                    continue
                try:
                    pf = builders[name]()
                    err = peers.check(pf[0](), ref)
                    _settle(settle)
                    row[f"{name}_us"] = round(graph_time_us(pf), 2)
                    row[f"{name}_err"] = err
                    del pf
                except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                    row[f"{name}_fail"] = f"{type(e).__name__}: {str(e)[:200]}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                Path(out).write_text(json.dumps({"copy_bw_TBps": bw / 1e12, "rows": rows}, indent=1))
    return rows


def print_table(rows):
    head = f"{'K':>6} {'N':>6} {'M':>5} {'ours':>8} {'cublas':>8} {'tiny':>8} {'gemlite':>8} {'humming':>8} {'floor':>7} {'xcub':>5} {'%fl':>4}"
    print(head)
    fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
    for r in rows:
        xc = r["cublas_us"] / r["ours_us"] if r.get("cublas_us") else float("nan")
        print(f"{r['K']:6d} {r['N']:6d} {r['M']:5d} {fmt(r['ours_us'])} {fmt(r['cublas_us'])} "
              f"{fmt(r['tinygemm_us'])} {fmt(r['gemlite_us'])} {fmt(r['humming_us'])} "
              f"{r['floor_us']:7.1f} {xc:5.2f} {100 * r['floor_us'] / r['ours_us']:4.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--peers", default="cublas,tinygemm,gemlite,humming")
    ap.add_argument("--out", default=None, help="results JSON")
    ap.add_argument("--tune", default=None, help="write a tuned config table here first")
    ap.add_argument("--tune-budget", type=float, default=300.0, help="seconds for tuning")
    ap.add_argument("--tune-only", action="store_true", help="write the table, skip the bench")
    ap.add_argument("--int-zero", action="store_true",
                    help="integer zero points (AutoAWQ / GPTQ / Humming's format) for ours and "
                         "the peers that take zero points; the floor counts 4-bit zeros")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds idle before each timing (0 for the old back-to-back order)")
    args = ap.parse_args()
    mk = import_kernels()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{gpu}: copy bandwidth {bw / 1e12:.3f} TB/s (read+write)", flush=True)
    if args.tune:
        tune(mk, args.tune, shapes, ms, args.tune_budget)
        importlib.import_module(mk.__name__ + ".tuning")._table.cache_clear()
        if args.tune_only:
            return
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = bench(mk, shapes, ms, set(args.peers.split(",")) - {""}, gpu, bw, args.out,
                 args.settle, args.int_zero)
    print_table(rows)


if __name__ == "__main__":
    main()
