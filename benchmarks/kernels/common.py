"""Timing helpers shared by the W4A16 benchmarks: CUDA-graph replays over rotating copies."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
L2_BYTES = 50 * 2**20


def import_kernels():
    """modelopt_lite.kernels when installed, else the repo's kernels/ folder. The tables' TILED
    configs get their tile-by-tile copies of the words (``allow_tiled_copies``) unless the
    environment says otherwise: ``MODELOPT_LITE_TILED=0`` times them on the words as packed."""
    try:
        import modelopt_lite.kernels as mk
    except ImportError:
        sys.path.insert(0, str(REPO))
        import kernels as mk
    if mk.tuning.ENV_TILED not in os.environ:
        mk.allow_tiled_copies()
    return mk


def copies_for(nbytes: int, l2_bytes: int = L2_BYTES) -> int:
    """Enough weight copies that one rotation streams > 4x L2 from memory."""
    return max(2, math.ceil(4 * l2_bytes / max(nbytes, 1)) + 1)


def capture(fns):
    """A CUDA graph of ``fns`` after two eager warm-up passes on a side stream. The graph
    reads the tensors the closures hold: keep ``fns`` alive while it is replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return graph


def graph_time_us(fns, reps: int = 25, warmup_ms: float = 100.0) -> float:
    """Median over ``reps`` graph replays of (replay time / len(fns)), in microseconds, after
    replaying for ``warmup_ms`` first, so that a kernel timed right after an idle spell does not
    run on a clock that has not ramped up yet (settle_check.py, NOTES.md)."""
    graph = capture(fns)
    graph.replay()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while n < 3 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        graph.replay()
        torch.cuda.synchronize()
        n += 1
    t = replay_median_us(graph, len(fns), reps)
    del graph
    return t


def replay_median_us(graph, n_calls: int, reps: int) -> float:
    """Median over ``reps`` timed replays of ``graph`` of (replay time / n_calls), in us."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting read + write: the faster
    of a 512 MB ``copy_`` (a memcpy) and the same bytes copied by an elementwise kernel on the
    SMs. On an H200 the memcpy of 512 MB reads 2.69 TB/s, the kernel 4.17 (NOTES.md, v51);
    on the H100 the memcpy gave the tables' 3.01 TB/s."""
    n = 1 << 29
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    a32, b32 = a.view(torch.int32), b.view(torch.int32)
    t = min(graph_time_us([lambda: b.copy_(a)] * 4, reps=20),
            graph_time_us([lambda: torch.add(a32, 0, out=b32)] * 4, reps=20))
    return 2 * n / (t * 1e-6)


def int4_layer_bytes(n, k, group=128, zero_bits=16) -> int:
    """An INT4 layer's bytes: the packed words, fp16 scales and zero points of ``zero_bits``
    (16: a half-precision zero term; 4: integer zero points)."""
    return n * k // 2 + (16 + zero_bits) * n * (k // group) // 8


def int4_floor_us(m, n, k, group, bw, zero_bits=16) -> float:
    nbytes = int4_layer_bytes(n, k, group, zero_bits) + 2 * m * k + 2 * m * n
    return nbytes / bw * 1e6


def time_humming(row: dict, w16, x, n_copies: int, group: int = 128) -> None:
    """row["humming_us"]: the Humming peer on the same problem; when it fails (an optional
    peer: the sweep goes on) row["humming_fail"] and a printed line instead."""
    import peers

    try:
        row["humming_us"] = round(graph_time_us(peers.humming(w16, group, x, n_copies)), 2)
    except Exception as e:  # noqa: BLE001
        row["humming_fail"] = f"{type(e).__name__}: {str(e)[:200]}"
        print("humming fail", row["humming_fail"], flush=True)


def save_row(rows: list, row: dict, out, bw: float, hide=()) -> None:
    """Append ``row``, print it (less the ``hide`` keys) and rewrite ``out`` with every row
    so far and the copy bandwidth, so a sweep cut short keeps what it measured."""
    torch.cuda.empty_cache()
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in hide}), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"copy_bw_TBps": bw / 1e12, "rows": rows}, indent=1))
