"""Does a GEMV timing depend on what ran just before it? Times our M = 1 call on the two large
shapes after 2 s idle (with and without graph_time_us's warm-up replays), and without warm-up
right after ~1 s of large-M tensor-core work and after sleeps of 0.5 and 2 s."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import make_problem, ours_fns  # noqa: E402
from common import copies_for, graph_time_us, import_kernels  # noqa: E402

mk = import_kernels()
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
rows = []
for k, n in [(8192, 28672), (28672, 8192)]:
    _, _, _, _, packed = make_problem(mk, k, n)
    nc = copies_for(packed.qweight.numel() * 4)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    cfgs = {"table": None,
            "sk32": dict(GEMV=True, BN=64, SPLIT_K=32, num_warps=4, PREFETCH=1),
            "sk32_bn32": dict(GEMV=True, BN=32, SPLIT_K=32, num_warps=2, PREFETCH=1, OUT16=True)}
    for name, cfg in cfgs.items():
        fns = ours_fns(mk, packed, x, nc, cfg)
        graph_time_us(fns, reps=5)
        time.sleep(2.0)
        r = {"K": k, "N": n, "cfg": name, "cold_no_warmup": graph_time_us(fns, warmup_ms=0)}
        time.sleep(2.0)
        r["cold_warmup100ms"] = graph_time_us(fns)
        for wait in (0.0, 0.5, 2.0):
            t0 = time.time()
            while time.time() - t0 < 1.0:  # ~1 s of heavy GEMMs
                for _ in range(20):
                    a @ a
                torch.cuda.synchronize()
            time.sleep(wait)
            r[f"after_heavy_wait{wait}_no_warmup"] = graph_time_us(fns, warmup_ms=0)
        r = {kk: round(v, 2) if isinstance(v, float) else v for kk, v in r.items()}
        rows.append(r)
        print(json.dumps(r), flush=True)
