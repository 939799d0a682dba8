"""Fashion-MNIST CNN: fp, INT8 PTQ, INT4 PTQ and INT4 QAT top-1 on the 10k test images.

Weight-only, symmetric, per output channel (the TensorRT INT8 weight layout; INT4 at the
same granularity). Data: Debian package ``dataset-fashion-mnist`` (IDX files, gzip).

    python benchmarks/qat/fashion_mnist.py [--epochs 2] [--qat-steps 300]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import row, write_rows  # noqa: E402

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.config import QuantConfig, QuantizerSpec  # noqa: E402
from modelopt_lite.plugins.loop import fit  # noqa: E402
from modelopt_lite.qat import QATConfig, convert, prepare_qat  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
MODEL = "fashion-mnist-cnn"


def read_idx(name: str) -> np.ndarray:
    with gzip.open(DATA / name, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix: str):
    x = torch.from_numpy(read_idx(f"{prefix}-images-idx3-ubyte.gz").copy()).float() / 255.0
    y = torch.from_numpy(read_idx(f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return ((x - 0.2860) / 0.3530).unsqueeze(1), y


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def batches(x, y, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    return [(x[i], y[i]) for i in order.split(batch_size)]


def ce_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def top1(model, x, y) -> float:
    model.eval()
    correct = sum((model(xb).argmax(-1) == yb).sum().item()
                  for xb, yb in zip(x.split(1000), y.split(1000)))
    return 100.0 * correct / len(x)


def weight_config(bits: int) -> QuantConfig:
    return QuantConfig(weight=QuantizerSpec(num_bits=bits, granularity="per_channel"), exclude=())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--qat-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xtr, ytr = load_split("train")
    xte, yte = load_split("t10k")
    fp = make_cnn()
    opt = torch.optim.Adam(fp.parameters(), 1e-3)
    steps = args.epochs * (len(xtr) // args.batch_size + 1)
    t0 = time.time()
    data = [b for e in range(args.epochs) for b in batches(xtr, ytr, args.batch_size, e)]
    fit(fp, data, opt, len(data), loss_fn=ce_loss, progress=args.progress)
    fp_s = time.time() - t0
    rows = [row(MODEL, "fp", "top1", top1(fp, xte, yte), steps, fp_s)]
    print(f"fp: {rows[0]['value']:.2f}% after {steps} steps, {fp_s:.0f} s", flush=True)
    for bits, method in ((8, "ptq_int8"), (4, "ptq_rtn")):
        q = mtl.quantize(copy.deepcopy(fp), weight_config(bits), progress=False)
        rows.append(row(MODEL, method, "top1", top1(q, xte, yte)))
    qat = prepare_qat(copy.deepcopy(fp), weight_config(4), qat=QATConfig(), progress=False)
    opt = torch.optim.Adam(qat.parameters(), 2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.qat_steps)
    t0 = time.time()
    fit(qat, batches(xtr, ytr, args.batch_size, 100), opt, args.qat_steps, loss_fn=ce_loss,
        scheduler=sched, progress=args.progress)
    qat_s = time.time() - t0
    convert(qat)
    rows.append(row(MODEL, "qat", "top1", top1(qat, xte, yte), args.qat_steps, qat_s))
    write_rows(rows, MODEL)


if __name__ == "__main__":
    main()
