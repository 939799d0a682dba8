"""GPU check of the fused kernel's large tiles (the H100 table's M <= 256 tiles and the old one)
against the fp32 reference over blocks 32/64/128, fp16/bf16, with and without zero points and
M = 1..513 (N = 1000, K = 2048); prints each case over tolerance and the count.

    python benchmarks/kernels/check_tiles.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import import_kernels  # noqa: E402

mk = import_kernels()
TILES = [dict(BM=256, BN=128, SPLIT_K=1, num_warps=8, num_stages=3, FUSE_K=True),
         dict(BM=256, BN=128, SPLIT_K=3, num_warps=8, num_stages=3, FUSE_K=True),
         dict(BM=128, BN=128, SPLIT_K=1, num_warps=8, num_stages=4, FUSE_K=True),
         dict(BM=64, BN=128, SPLIT_K=4, num_warps=8, num_stages=3, FUSE_K=True)]
bad = 0
for ti, cfg in enumerate(TILES):
    for group in (32, 64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            for zero in (True, False):
                for m in (1, 7, 33, 130, 513):
                    torch.manual_seed(m * 7 + group)
                    n, k = 1000, 2048
                    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
                    scale = torch.rand(n, k // group, device="cuda") * 0.02 + 0.002
                    zp = torch.rand(n, k // group, device="cuda") * 15 if zero else None
                    p = mk.pack_weight(codes, scale, zp, group, dtype)
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    ref = mk.w4a16_reference(x.float(), p._replace(
                        scale=p.scale.float(), zterm=None if p.zterm is None else p.zterm.float()))
                    y = mk.w4a16_matmul(x, p, None, cfg)
                    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                    tol = 2e-3 if dtype == torch.float16 else 1.2e-2
                    if not err < tol:
                        bad += 1
                        print(f"tile {ti} group {group} {dtype} zero {zero} m {m}: {err:.3e}")
print("bad", bad)
