"""Data-parallel AWQ on N GPUs (NCCL) vs one GPU on the same data: same weights? how fast?

Rank 0 first calibrates alone on all samples (before the process group exists, so nothing
reduces), then every rank calibrates on its shard with the statistics all-reduced. Rank 0
compares the fake-quantized weights of the two and appends rows
``{"world_size", "identical_to_1rank", "wall_s", "gpu", "date", ...}`` to
``benchmarks/results/multigpu.json`` (or ``--out``).

    torchrun --nproc_per_node 2 benchmarks/streaming/multigpu_awq.py
    # CPU check of the same code (gloo):
    torchrun --nproc_per_node 2 benchmarks/streaming/multigpu_awq.py --device cpu \\
        --hidden 128 --inter 256 --heads 4 --kv-heads 2 --layers 2 --vocab 500 \\
        --samples 4 --seq 32 --dtype float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import append_rows, random_llama  # noqa: E402

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.calib import distributed as D  # noqa: E402
from modelopt_lite.layers import quant_modules  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "multigpu.json"


def calibrate(a, tokens, device):
    model = random_llama(a, getattr(torch, a.dtype)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    mtl.quantize(model, a.preset, calib=tokens, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    weights = {n: m.quantized_weight().detach().cpu() for n, m in quant_modules(model)}
    return model, weights, wall


def warm_up(a, tokens, device):
    """One untimed 1-layer calibration: CUDA context, cuBLAS and NCCL set-up off the clock."""
    small = argparse.Namespace(**{**vars(a), "layers": 1})
    calibrate(small, tokens[: max(1, tokens.shape[0] // 8)], device)


def compare(ref, got):
    bitwise = all(torch.equal(ref[k], got[k]) for k in ref)
    diff = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    scale = max(ref[k].float().abs().max().item() for k in ref)
    return bitwise, diff, diff <= 1e-3 * scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--preset", default="int4_awq")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--machine", default=None)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = a.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tokens = torch.randint(0, a.vocab, (a.samples, a.seq),
                           generator=torch.Generator().manual_seed(1))
    gpu = a.machine or (torch.cuda.get_device_name(device) if cuda else "cpu")
    date = datetime.date.today().isoformat()
    rows = []
    if rank == 0:  # the 1-rank reference: no process group yet, so nothing reduces
        warm_up(a, tokens, device)
        _, ref, wall1 = calibrate(a, tokens, device)
        rows.append({"world_size": 1, "identical_to_1rank": True, "wall_s": round(wall1, 2),
                     "gpu": gpu, "date": date})
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        mtl.config.resolve_config(a.preset)  # imports the algorithms before timing
        warm_up(a, D.shard_tokens(tokens), device)
        model, got, wall = calibrate(a, D.shard_tokens(tokens), device)
        mismatched = D.mismatched_tensors(model)
        walls = torch.zeros(world, dtype=torch.float64)
        walls[rank] = wall
        D.reduce_sum_(walls)  # every rank's wall time; the run takes the slowest
        if rank == 0:
            bitwise, diff, close = compare(ref, got)
            rows.append({"world_size": world, "identical_to_1rank": bitwise or close,
                         "bitwise_equal": bitwise, "max_abs_diff": diff,
                         "ranks_identical": not mismatched, "wall_s": round(walls.max().item(), 2),
                         "rank_wall_s": [round(w, 2) for w in walls.tolist()],
                         "gpu": gpu, "date": date, "preset": a.preset,
                         "model": f"llama-random-h{a.hidden}-i{a.inter}-l{a.layers}-{a.dtype}",
                         "calib_tokens": int(tokens.numel())})
            for r in rows:
                print(json.dumps(r), flush=True)
            append_rows(a.out, rows)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
