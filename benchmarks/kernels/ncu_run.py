"""One call each of ours and a peer per M, between profiler start/stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --set full -o prof \
        python benchmarks/kernels/ncu_run.py --shape 8192x28672 --ms 1,64,1024 --peer humming

Weights and peer layers are built and every kernel is run (and JIT-compiled) before the
profiler starts, so only the timed calls are captured; ncu flushes caches between its replays,
so each captured call reads its weights from memory as in bench_w4a16.py's rotation.
``--twin KEY=VALUE,...`` profiles the shipped config with those settings too (after ours);
``--int-zero`` quantizes with integer zero points (bench_w4a16.make_problem).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from bench_w4a16 import make_problem  # noqa: E402
from common import import_kernels  # noqa: E402
from sweep_large import parse_twin  # noqa: E402
from sweep_v5 import shipped  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8192x28672", help="KxN")
    ap.add_argument("--ms", default="1,16,64,256,1024")
    ap.add_argument("--peer", default="humming", choices=("humming", "cublas", "none"))
    ap.add_argument("--twin", default=None, metavar="KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--int-zero", action="store_true")
    a = ap.parse_args()
    k, n = map(int, a.shape.split("x"))
    mk = import_kernels()
    w16, _, _, _, packed = make_problem(mk, k, n, integer_zero=a.int_zero)
    calls = []
    for m in map(int, a.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        calls.append((f"ours M={m}", lambda x=x: mk.w4a16_matmul(x, packed)))
        if a.twin:
            cfg = {**shipped(mk, m, n, k), **parse_twin(a.twin)}
            calls.append((f"twin M={m}", lambda x=x, c=cfg: mk.w4a16_matmul(x, packed, None, c)))
        if a.peer == "humming":
            calls.append((f"humming M={m}", peers.humming(w16, 128, x, 1)[0]))
        elif a.peer == "cublas":
            calls.append((f"cublas M={m}", peers.cublas(w16, x, 1)[0]))
    for _, f in calls:
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    for name, f in calls:
        torch.cuda.nvtx.range_push(name)
        torch.cuda.profiler.start()
        f()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        torch.cuda.nvtx.range_pop()
        print("ran", name, flush=True)


if __name__ == "__main__":
    main()
