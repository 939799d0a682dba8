"""SM clock and board power while a kernel runs back to back: ours (the shipped dispatch) and
cuBLAS fp16 on the same (K, N, M), each replayed for --seconds in a CUDA graph while NVML is
sampled every 20 ms. A kernel that runs on a lower clock than cuBLAS at the same power cap is
power-bound, and fewer instructions per multiply-add would speed it up more than any tiling.

    python benchmarks/kernels/clocks.py --shapes 8192x28672,28672x8192 --ms 256,1024
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pynvml
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_w4a16 import ours_fns, parse_shapes, problems  # noqa: E402
from common import import_kernels  # noqa: E402
import peers  # noqa: E402


def sustained(fns, seconds):
    """Replay one graph of ``fns`` for ``seconds``: (us per call, median SM MHz, median W)."""
    graph = torch.cuda.CUDAGraph()
    for f in fns:
        f()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                            pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3))
            time.sleep(0.02)

    for _ in range(20):   # ramp up first
        graph.replay()
    torch.cuda.synchronize()
    th = threading.Thread(target=sample)
    th.start()
    n, t0 = 0, time.perf_counter()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            graph.replay()
        n += 10
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    stop.set()
    th.join()
    us = start.elapsed_time(end) * 1e3 / (n * len(fns))
    half = samples[len(samples) // 4:]   # the settled part
    return us, statistics.median(s[0] for s in half), statistics.median(s[1] for s in half)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x28672,28672x8192", help="KxN,...")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pynvml.nvmlInit()
    mk = import_kernels()
    rows = []
    for k, n, m, w16, packed, nc, n16, x, _ in problems(
            mk, parse_shapes(a.shapes), [int(v) for v in a.ms.split(",")]):
        row = {"K": k, "N": n, "M": m, "gpu": torch.cuda.get_device_name()}
        for name, fns in (("ours", ours_fns(mk, packed, x, nc)),
                          ("cublas", peers.cublas(w16, x, n16))):
            us, mhz, watts = sustained(fns, a.seconds)
            row[name] = {"us": round(us, 1), "sm_mhz": mhz, "watts": round(watts)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
