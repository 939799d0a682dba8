"""Activation range calibrators: collect statistics during calibration, then give an amax.

Each calibrator is registered by name (the ``calibrator`` field of a QuantizerSpec) and has
``collect(x)`` and ``compute_amax(num_bits) -> Tensor``. Collected state reduces across
``torch.distributed`` ranks inside ``compute_amax`` when a process group exists.
"""

from __future__ import annotations

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


def make_calibrator(spec):
    from ..config import ConfigError

    if spec.calibrator not in CALIBRATORS:
        raise ConfigError(f"calibrator {spec.calibrator!r} is not available; registered: "
                          f"{sorted(CALIBRATORS)}")
    return CALIBRATORS[spec.calibrator](spec)
