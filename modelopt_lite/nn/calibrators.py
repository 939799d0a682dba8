"""Activation range calibrators: collect statistics during calibration, then give an amax.

Each calibrator is registered by name (the ``calibrator`` field of a QuantizerSpec) and has
``collect(x)`` and ``compute_amax(num_bits) -> Tensor``. Collected state reduces across
``torch.distributed`` ranks inside ``compute_amax`` when a process group exists.
"""

from __future__ import annotations

import math

import torch

CALIBRATORS: dict[str, type] = {}


def register_calibrator(name: str):
    def wrap(cls):
        CALIBRATORS[name] = cls
        return cls

    return wrap


def all_reduce_(t: torch.Tensor, op: str = "max") -> torch.Tensor:
    """In-place all-reduce across ranks when torch.distributed is initialised (else a no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        red = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
        dist.all_reduce(t, op=red)
    return t


@register_calibrator("max")
class MaxCalibrator:
    """Running absolute maximum over everything seen."""

    def __init__(self, spec):
        self.spec = spec
        self.amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        cur = x.detach().abs().amax().float()
        self.amax = cur if self.amax is None else torch.maximum(self.amax, cur)

    def compute_amax(self) -> torch.Tensor | None:
        if self.amax is None:
            return None
        return all_reduce_(self.amax.clone(), "max")


class HistogramCalibrator:
    """Histogram of |x| over ``[0, R]`` in ``bins`` equal bins, R a power of two (bounded memory).

    When a value exceeds R, R doubles and pairs of bins merge (exactly, no re-binning error).
    Across ranks the ranges meet at the largest R before the counts are summed.
    """

    bins = 2048

    def __init__(self, spec):
        self.spec = spec
        self.hist: torch.Tensor | None = None
        self.range = 0.0

    @staticmethod
    def _pow2_at_least(x: float) -> float:
        return float(2.0 ** math.ceil(math.log2(max(x, 1e-30))))

    def _grow(self, new_range: float) -> None:
        while self.range < new_range:
            self.hist = self.hist.view(-1, 2).sum(1)
            self.hist = torch.cat([self.hist, torch.zeros_like(self.hist)])
            self.range *= 2.0

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().abs().float().flatten()
        top = x.max().item()
        if self.hist is None:
            self.range = self._pow2_at_least(top)
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        elif top > self.range:
            self._grow(self._pow2_at_least(top))
        self.hist += torch.histc(x, self.bins, 0.0, self.range).double()

    def reduced(self) -> tuple[torch.Tensor, float] | None:
        """(counts, range) over every rank, or None when nothing was collected."""
        if self.hist is None:
            return None
        r = all_reduce_(torch.tensor([self.range], dtype=torch.float64,
                                     device=self.hist.device), "max").item()
        self._grow(r)
        return all_reduce_(self.hist.clone(), "sum"), self.range

    def edges(self, rng: float) -> torch.Tensor:
        return torch.linspace(0.0, rng, self.bins + 1, dtype=torch.float64)


@register_calibrator("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """amax = the ``spec.percentile``-th percentile of |x| (linear within the bin)."""

    def compute_amax(self) -> torch.Tensor | None:
        got = self.reduced()
        if got is None:
            return None
        hist, rng = got
        return torch.tensor(percentile_from_hist(hist.cpu(), rng, self.spec.percentile),
                            dtype=torch.float32)


def percentile_from_hist(hist: torch.Tensor, rng: float, percentile: float) -> float:
    """The ``percentile`` of the values a histogram over ``[0, rng]`` counts (linear in a bin)."""
    cdf = hist.double().cumsum(0)
    target = cdf[-1].item() * percentile / 100.0
    i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).item())
    i = min(i, hist.numel() - 1)
    below = cdf[i - 1].item() if i > 0 else 0.0
    frac = (target - below) / max(hist[i].item(), 1e-30)
    width = rng / hist.numel()
    return (i + min(max(frac, 0.0), 1.0)) * width


@register_calibrator("mse")
class MSECalibrator(HistogramCalibrator):
    """amax minimising the mean squared error of symmetric fake-quantization of x, with the
    histogram's bin centres standing for the values; candidates are the bin edges."""

    def compute_amax(self) -> torch.Tensor | None:
        got = self.reduced()
        if got is None:
            return None
        hist, rng = got
        return torch.tensor(mse_amax_from_hist(hist.cpu(), rng, self.spec.num_bits),
                            dtype=torch.float32)


def mse_amax_from_hist(hist: torch.Tensor, rng: float, num_bits: int, stride: int = 1) -> float:
    """The candidate amax (a bin edge) with the smallest histogram-weighted quantization MSE."""
    n = hist.numel()
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) * (rng / n)
    counts = hist.double()
    nz = counts > 0
    centres, counts = centres[nz], counts[nz]
    qmax = 2 ** (num_bits - 1) - 1
    cands = torch.arange(stride, n + 1, stride, dtype=torch.float64) * (rng / n)
    best, best_err = rng, math.inf
    for chunk in cands.split(256):
        scale = (chunk / qmax)[:, None]
        q = torch.clamp(torch.round(centres[None, :] / scale), max=qmax) * scale
        err = ((q - centres[None, :]).pow(2) * counts[None, :]).sum(1)
        j = int(err.argmin())
        if err[j].item() < best_err:
            best, best_err = chunk[j].item(), err[j].item()
    return best


def make_calibrator(spec):
    from ..config import ConfigError

    if spec.calibrator not in CALIBRATORS:
        raise ConfigError(f"calibrator {spec.calibrator!r} is not available; registered: "
                          f"{sorted(CALIBRATORS)}")
    return CALIBRATORS[spec.calibrator](spec)
