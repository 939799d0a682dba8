"""TMA activation tiles (`TMA`) on the GPU: for fused tiles x pipeline stages, the relative
error against the float32 product and the time, with and without TMA, one process.

    python benchmarks/kernels/check_tma.py --shape 8192x28672 --ms 256,1024
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, problems  # noqa: E402
from common import graph_time_us, import_kernels  # noqa: E402

TILES = [dict(BM=256, BN=128, num_warps=8, PAIRS=True), dict(BM=128, BN=128, num_warps=8,
         PAIRS=2), dict(BM=64, BN=64, num_warps=4), dict(BM=64, BN=256, num_warps=8, PAIRS=2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x28672")
    ap.add_argument("--ms", default="64,256,1024")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    mk = import_kernels()
    rows = []
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    for k, n, m, w16, packed, nc, n16, x, ref in problems(mk, shapes,
                                                          [int(v) for v in a.ms.split(",")]):
        for tile, st, tma in itertools.product(TILES, map(int, a.stages.split(",")),
                                               (False, True)):
            if (tile["BM"] == 64) != (m <= 64):
                continue
            cfg = dict(tile, SPLIT_K=1, num_stages=st, FUSE_K=True, GROUP_N=8, TMA=tma)
            try:
                errs = []
                for _ in range(3):
                    y = mk.w4a16_matmul(x, packed, None, cfg).float()
                    errs.append(((y - ref).norm() / ref.norm()).item())
                us = graph_time_us(ours_fns(mk, packed, x, nc, cfg), reps=10)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(k, n, m, cfg, "fail", type(e).__name__, str(e)[:120], flush=True)
                continue
            row = dict(K=k, N=n, M=m, cfg=cfg, err=max(errs), us=round(us, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
