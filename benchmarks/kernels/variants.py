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
        for bn, sk, st, asm in itertools.product((32, 64, 128), (1, 2, 4, 8), (3, 5), (True, False)):
            yield dict(BM=16, BN=bn, SPLIT_K=sk, num_warps=4, num_stages=st, USE_ASM=asm)
    else:
        for bm, bn, nw, st in itertools.product((32, 64, 128) if m <= 64 else (64, 128, 256),
                                                (64, 128, 256), (4, 8), (3, 4)):
            if bm * bn <= 128 * 256 and not (nw == 4 and bm * bn > 64 * 128):
                yield dict(BM=bm, BN=bn, SPLIT_K=1, num_warps=nw, num_stages=st)


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
        for t, err, cfg in res[:3]:
            print(f"K={k} N={n} M={m} t={t:.1f}us err={err:.1e} {cfg}", flush=True)
