"""Quick sweep of kernel variants on the two large Llama shapes (for NOTES.md)."""
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import make_problem, ours_fns  # noqa: E402
from common import copies_for, graph_time_us, import_kernels  # noqa: E402

mk = import_kernels()
MS = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16, 64, 256, 1024]


def cands(m):
    if m <= 16:
        for (bn, nw), sk, fuse in itertools.product(((64, 4), (128, 4), (256, 8)), (4, 8), (True, False)):
            yield dict(BM=16, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, FUSE_K=fuse)
    elif m <= 64:
        for (bn, nw), sk, fuse in itertools.product(((64, 4), (128, 8)), (1, 2), (True, False)):
            yield dict(BM=64, BN=bn, SPLIT_K=sk, num_warps=nw, num_stages=3, FUSE_K=fuse)
    else:
        for (bm, bn, nw), st, fuse in itertools.product(((128, 128, 8), (128, 256, 8), (64, 128, 4)), (3, 4), (True, False)):
            yield dict(BM=bm, BN=bn, SPLIT_K=1, num_warps=nw, num_stages=st, FUSE_K=fuse)


for k, n in [(8192, 28672), (28672, 8192)]:
    _, _, _, _, packed = make_problem(mk, k, n)
    nc = copies_for(packed.qweight.numel() * 4)
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = mk.w4a16_reference(x, packed).float()
        res = []
        for cfg in cands(m):
            try:
                fns = ours_fns(mk, packed, x, nc, cfg)
                err = ((fns[0]().float() - ref).norm() / ref.norm()).item()
                res.append((graph_time_us(fns, reps=10), err, cfg))
            except Exception as e:  # noqa: BLE001
                print("fail", cfg, str(e)[:200], flush=True)
        res.sort(key=lambda r: r[0])
        for fuse in (True, False):
            t, err, cfg = next(r for r in res if r[2].get("FUSE_K", False) == fuse)
            print(f"K={k} N={n} M={m} fuse={fuse} t={t:.1f}us err={err:.1e} {cfg}", flush=True)
