"""Split-K correctness of the fused kernel on the GPU at the table's shapes: every (shape, M,
tile, K split, float32 buffer or fp16 atomics (`OUT16`)) against the float32 product of the
dequantized weight, several calls each (a race shows as a call that differs from the others).

    python benchmarks/kernels/check_splitk.py --reps 6
"""
import argparse
import itertools
import sys

import torch

from modelopt_lite.kernels import dequantize, pack_weight, w4a16_matmul

BASE = dict(FUSE_K=True, GROUP_N=8)
TILES = [dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=64, BN=128, num_warps=8,
         num_stages=4, PAIRS=2), dict(BM=64, BN=256, num_warps=8, num_stages=4, PAIRS=2),
         dict(BM=256, BN=128, num_warps=8, num_stages=3, PAIRS=True)]
SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672), (28672, 8192)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4, help="calls per (shape, M, config)")
    ap.add_argument("--ms", type=lambda v: [int(t) for t in v.split(",")], default=[64, 256])
    ap.add_argument("--splits", type=lambda v: [int(t) for t in v.split(",")], default=[2, 4])
    a = ap.parse_args()
    torch.manual_seed(0)
    bad = 0
    for (k, n), m, tile, split, out16 in itertools.product(
            SHAPES, a.ms, TILES, a.splits, (False, True)):
        if (m <= 64) != (tile["BM"] == 64):
            continue
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        scale = torch.rand(n, k // 128, device="cuda") * 0.02 + 0.002
        p = pack_weight(codes, scale, torch.rand(n, k // 128, device="cuda") * 15, 128,
                        torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ dequantize(p).float().t()
        cfg = dict(BASE, **tile, SPLIT_K=split, OUT16=out16)
        errs = []
        for _ in range(a.reps):
            y = w4a16_matmul(x, p, None, cfg).float()
            errs.append(((y - ref).norm() / ref.norm()).item())
        ok = max(errs) < 3e-3
        bad += not ok
        print(f"K{k} N{n} M{m} {tile} SPLIT_K {split} OUT16 {out16}: "
              f"{'ok' if ok else 'WRONG'} {[f'{e:.2e}' for e in errs]}", flush=True)
    print("bad", bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
