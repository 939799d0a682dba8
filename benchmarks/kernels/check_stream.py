"""Stream-K (`STREAM`) and split-K correctness of the fused kernel on the GPU at the table's
shapes: every (shape, M, tile, K partition, float32 or fp16 atomics) against the float32
product of the dequantized weight, several calls each (a race shows as a call that differs);
for a wrong stream-K result, the wrong output tiles and the programs whose runs touch them.

    python benchmarks/kernels/check_stream.py --reps 8
"""
import argparse
import itertools
import sys

import torch

from modelopt_lite.kernels import dequantize, pack_weight, w4a16_matmul
from modelopt_lite.kernels.tuning import _num_sms

BASE = dict(SPLIT_K=1, FUSE_K=True, GROUP_N=8)
TILES = [dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=64, BN=128, num_warps=8,
         num_stages=4, PAIRS=2), dict(BM=64, BN=256, num_warps=8, num_stages=4, PAIRS=2),
         dict(BM=256, BN=128, num_warps=8, num_stages=3, PAIRS=True)]


def runs(total, programs):
    per = -(-total // programs)
    return [(p * per, min(p * per + per, total)) for p in range(programs)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4, help="calls per (shape, M, config)")
    ap.add_argument("--ms", type=lambda v: [int(t) for t in v.split(",")], default=[64, 256])
    a = ap.parse_args()
    torch.manual_seed(0)
    bad = 0
    shapes = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672), (28672, 8192)]
    for (k, n), m, tile, (stream, split), out16 in itertools.product(
            shapes, a.ms, TILES, ((1, 1), (2, 1), (0, 4)), (False, True)):
        if (m == 64) != (tile["BM"] == 64):
            continue
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        scale = torch.rand(n, k // 128, device="cuda") * 0.02 + 0.002
        p = pack_weight(codes, scale, torch.rand(n, k // 128, device="cuda") * 15, 128,
                        torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ dequantize(p).float().t()
        cfg = dict(BASE, **tile, STREAM=stream, SPLIT_K=split, OUT16=out16)
        errs, worst = [], None
        for _ in range(a.reps):
            y = w4a16_matmul(x, p, None, cfg).float()
            errs.append(((y - ref).norm() / ref.norm()).item())
            if errs[-1] == max(errs):
                worst = y
        y = worst
        ok = max(errs) < 3e-3
        bad += not ok
        print(f"K{k} N{n} M{m} {tile} STREAM {stream} SPLIT_K {split} OUT16 {out16}: "
              f"{'ok' if ok else 'WRONG'} {[f'{e:.2e}' for e in errs]}", flush=True)
        if not ok and stream:
            bn, bm, kt = tile["BN"], min(tile["BM"], m), -(-k // 128)
            colerr = ((y - ref).abs() > 0.05 * ref.abs().max()).any(0).nonzero().flatten()
            tiles = sorted({int(c) // bn for c in colerr})
            print("  wrong row tiles:", tiles[:40], "of", -(-n // bn))
            total = -(-n // bn) * -(-m // bm) * kt
            progs = min(stream * _num_sms(x.device), total)
            for t in tiles[:4]:
                print("  tile", t, "runs:", [(i, a, b) for i, (a, b) in
                      enumerate(runs(total, progs)) if a < (t + 1) * kt and b > t * kt])
    print("bad", bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
