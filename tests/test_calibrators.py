"""Activation range calibrators (max, percentile, MSE) against independent references."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modelopt_lite.config import QuantizerSpec
from modelopt_lite.nn import functional as F
from modelopt_lite.nn.calibrators import HistogramCalibrator, make_calibrator


def heavy_tailed(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(6) * 20


def feed(kind, batches, **spec):
    cal = make_calibrator(QuantizerSpec(granularity="per_tensor", calibrator=kind, **spec))
    for b in batches:
        cal.collect(b)
    return cal


def growing_batches(seed=0):
    """Batches whose range grows, so the histogram has to widen (and merge bins) mid-way."""
    return [heavy_tailed(20000, seed + i) * (1 + 3 * i) for i in range(4)]


@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_and_torch_quantile(pct):
    batches = growing_batches(seed=int(pct * 10))
    cal = feed("percentile", batches, percentile=pct)
    amax = cal.compute_amax().item()
    data = torch.cat(batches).abs()
    ref_np = float(np.percentile(data.numpy(), pct))
    ref_t = torch.quantile(data.double(), pct / 100).item()
    width = cal.range / cal.bins
    assert abs(ref_np - ref_t) < width  # the references agree with each other
    assert abs(amax - ref_np) <= 2 * width, (amax, ref_np, width)
    assert amax < data.max().item() * 0.9  # it really clips the tail (the test can fail)


def _mse(x, amax):
    scale = torch.tensor(amax) / 127
    return (F.fake_quant(x, scale, None, 8, True) - x).pow(2).mean().item()


def test_mse_calibrator_matches_brute_force_grid():
    batches = growing_batches(seed=7)
    x = torch.cat(batches)
    amax = feed("mse", batches).compute_amax().item()
    grid = torch.linspace(x.abs().max().item() / 200, x.abs().max().item(), 200)
    errors = [_mse(x, a.item()) for a in grid]
    best = int(np.argmin(errors))
    assert _mse(x, amax) <= errors[best] * 1.02, (amax, grid[best].item())
    assert abs(amax - grid[best].item()) / grid[best].item() < 0.15
    assert amax < 0.95 * x.abs().max().item()  # it clips (the test can fail)
    assert _mse(x, amax) < 0.9 * _mse(x, x.abs().max().item())


def test_max_calibrator_and_histogram_bookkeeping():
    batches = growing_batches(seed=3)
    assert feed("max", batches).compute_amax().item() == torch.cat(batches).abs().max().item()
    cal = feed("percentile", batches)
    assert cal.hist.numel() == HistogramCalibrator.bins  # bounded memory
    assert cal.hist.sum().item() == sum(b.numel() for b in batches)  # nothing lost in merges
    assert cal.range >= torch.cat(batches).abs().max().item() > cal.range / 2
    assert feed("mse", []).compute_amax() is None


def _rank_worker(rank, init_file, batches, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mine = batches[rank::2]
        res = {k: feed(k, mine).compute_amax() for k in ("max", "percentile", "mse")}
        torch.save(res, os.path.join(os.path.dirname(init_file), f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_to_the_single_process_answer():
    # rank 0 sees the small batches, rank 1 the large ones: their histogram ranges differ
    batches = growing_batches(seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(os.path.join(tmp, "init"), batches, tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(2)]
    for kind in ("max", "percentile", "mse"):
        single = feed(kind, batches).compute_amax()
        assert torch.equal(ranks[0][kind], ranks[1][kind]), kind
        assert torch.allclose(ranks[0][kind], single, rtol=1e-6), kind
