"""How fast can this GPU stream the bytes of an INT4 layer at all? A read-only Triton kernel
(each program XORs its run of int32 words and writes one value) over the layer's bytes
(packed words + fp16 scales + fp16 zero points), timed as the W4A16 benchmark times the
kernels (CUDA graph, rotating copies over 4x L2, median), beside a device copy of the same
bytes. Its best time is a measured floor for M = 1, the number the targets' "90 % of the
memory floor" should be read against (NOTES.md).

    python benchmarks/kernels/read_floor.py --shapes 8192x28672,28672x8192 --out read_floor.json
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copies_for, graph_time_us, int4_layer_bytes  # noqa: E402


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read(src, out, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr, CG: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        if CG == 1:
            acc ^= tl.load(src + offs, mask=offs < n_words, other=0, cache_modifier=".cg")
        elif CG == 2:
            acc ^= tl.load(src + offs, mask=offs < n_words, other=0, eviction_policy="evict_first")
        else:
            acc ^= tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.reduce(acc, 0, _xor))


def xor_all(t: torch.Tensor) -> int:
    return int(np.bitwise_xor.reduce(t.cpu().numpy()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x28672,28672x8192", help="KxN,...")
    ap.add_argument("--blocks", default="2048,4096,8192")
    ap.add_argument("--iters", default="1,4,16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--out", default="read_floor.json")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        nbytes = int4_layer_bytes(n, k)
        n_words = nbytes // 4
        copies = [torch.randint(-2**31, 2**31 - 1, (n_words,), dtype=torch.int32, device="cuda")
                  for _ in range(copies_for(nbytes))]
        dst = [torch.empty_like(c) for c in copies]
        row = {"K": k, "N": n, "bytes": nbytes, "gpu": gpu, "date": date, "copies": len(copies)}
        row["copy_us"] = round(graph_time_us([lambda s=s, d=d: d.copy_(s)
                                              for s, d in zip(copies, dst)]), 2)
        del dst
        ref = xor_all(copies[0])
        best = None
        for block, iters, warps, cg in itertools.product(
                [int(v) for v in args.blocks.split(",")], [int(v) for v in args.iters.split(",")],
                [int(v) for v in args.warps.split(",")], (0, 1, 2)):
            grid = triton.cdiv(n_words, block * iters)
            out = torch.empty(grid, dtype=torch.int32, device="cuda")
            fns = [lambda s=s: _read[(grid,)](s, out, n_words, BLOCK=block, ITERS=iters, CG=cg,
                                              num_warps=warps) for s in copies]
            fns[0]()  # check once: the kernel reads every word
            if xor_all(out) != ref:
                raise RuntimeError(f"read kernel wrong for BLOCK {block} ITERS {iters}")
            t = graph_time_us(fns)
            cfg = {"BLOCK": block, "ITERS": iters, "warps": warps,
                   "load": ("", ".cg", "evict_first")[cg], "us": round(t, 2)}
            row.setdefault("configs", []).append(cfg)
            if best is None or t < best["us"]:
                best = cfg
        row["read_us"] = best["us"]
        row["read_best"] = best
        row["read_TBps"] = round(nbytes / best["us"] / 1e6, 3)
        row["copy_TBps_rw"] = round(2 * nbytes / row["copy_us"] / 1e6, 3)
        print(json.dumps({k2: v for k2, v in row.items() if k2 != "configs"}), flush=True)
        rows.append(row)
        del copies
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
