"""2:4 sparse fp16 GEMM (torch.sparse semi-structured) vs dense F.linear on Llama layer shapes.

Each K x N layer (weight [N, K], a random 2:4 pattern) runs at M tokens; times are
``triton.testing.do_bench`` medians (L2 flushed between runs) in microseconds, for cuBLAS
dense, and for the sparse weight through each available backend (CUTLASS, cuSPARSELt).
Also checks ``deploy_sparse`` on a small model. Writes ``sparse_speed_<gpu>.json``.

    python benchmarks/sparsity/bench_sparse_speed.py --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]  # K x N
MS = [1, 16, 64, 256, 1024]


def random_24(n, k, device="cuda"):
    w = torch.randn(n, k, device=device, dtype=torch.float16)
    keep = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device=device, dtype=torch.bool).scatter_(-1, keep, True)
    return w * mask.reshape(n, k)


def to_sparse(w, cutlass: bool):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    return to_sparse_semi_structured(w)


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000.0


def gpu_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def shape_rows():
    rows = []
    for k, n in SHAPES:
        w = random_24(n, k)
        sparse = {}
        for backend, cutlass in (("cutlass", True), ("cusparselt", False)):
            try:
                sparse[backend] = to_sparse(w, cutlass)
            except Exception as err:  # backend not built into this torch
                print(f"{backend}: {err}")
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = F.linear(x, w)
            row = {"K": k, "N": n, "M": m, "dense_us": round(bench(lambda: F.linear(x, w)), 2)}
            for backend, ws in sparse.items():
                try:
                    out = F.linear(x, ws)
                    row[f"rel_err_{backend}"] = float((out - ref).float().norm() / ref.float().norm())
                    row[f"sparse_{backend}_us"] = round(bench(lambda: F.linear(x, ws)), 2)
                except Exception as err:
                    row[f"sparse_{backend}_us"] = None
                    print(f"{backend} K={k} N={n} M={m}: {err}")
            best = [v for key, v in row.items() if key.startswith("sparse_") and v]
            row["sparse_us"] = min(best) if best else None
            row["speedup"] = round(row["dense_us"] / row["sparse_us"], 3) if best else None
            print(json.dumps(row), flush=True)
            rows.append(row)
        del w, sparse
        torch.cuda.empty_cache()
    return rows


def deploy_check():
    from torch import nn

    import modelopt_lite as mtl
    from modelopt_lite.sparsity import deploy_sparse

    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 256)).half().cuda()
    mtl.sparsify(model, progress=False)
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    ref = model(x)
    swapped, skipped = deploy_sparse(model)
    out = model(x)
    return {"swapped": swapped, "skipped": skipped,
            "rel_err": float((out - ref).float().norm() / ref.float().norm())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = p.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "timing": "triton do_bench median, L2 flushed between runs, microseconds",
              "dtype": "float16", "weight": "[N, K], random 2:4 pattern"}
    try:
        result["deploy_check"] = deploy_check()
    except Exception as err:
        result["deploy_check"] = {"error": repr(err)}
    print(json.dumps(result["deploy_check"]), flush=True)
    result["rows"] = shape_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sparse_speed_{gpu_tag()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
