"""Activation statistics collected with forward hooks: per-input-channel absmax and mean |x|.

Statistics reduce across ``torch.distributed`` ranks (max for absmax, sum for the running
sums) so every rank sees the statistics of the whole calibration set.

Example::

    stats = collect_input_stats(model, {"mlp.up": model.mlp.up}, forward_loop)
    stats["mlp.up"].absmax   # [in_features]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.calibrators import all_reduce_
from ..nn.tensor_quantizer import CalibrationError


@dataclass
class ChannelStats:
    """Per-input-channel statistics of the activations entering one layer."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    count: int

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()


class ChannelStatsCollector:
    def __init__(self, name: str, channel_dim: int = -1):
        self.name, self.channel_dim = name, channel_dim
        self.absmax = self.abssum = None
        self.count = 0

    def __call__(self, module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
        self.update(x)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"{self.name}: NaN/Inf in the activations entering this layer during "
                "calibration; run calibration in float32/bfloat16 or check the inputs")
        x = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim]).float().abs()
        amax, asum = x.amax(0), x.sum(0).double()  # float64: order-free sums
        if self.absmax is None:
            self.absmax, self.abssum = amax, asum
        else:
            self.absmax = torch.maximum(self.absmax, amax)
            self.abssum = self.abssum + asum
        self.count += x.shape[0]

    def result(self, required: bool = True) -> ChannelStats | None:
        """The statistics over every rank; None (``required=False``) or an error when no
        activation reached the layer."""
        if self.absmax is None:
            if not required:
                return None
            raise CalibrationError(f"{self.name}: no activations reached this layer during "
                                   "calibration; check the forward loop or exclude the layer")
        count = torch.tensor([float(self.count)], device=self.absmax.device)
        return ChannelStats(all_reduce_(self.absmax.clone(), "max"),
                            all_reduce_(self.abssum.clone(), "sum"),
                            int(all_reduce_(count, "sum").item()))


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def collect_input_stats(model: nn.Module, modules: dict[str, nn.Module], forward_loop
                        ) -> dict[str, ChannelStats]:
    """Run ``forward_loop(model)`` once and return the input statistics of each module."""
    collectors = {n: ChannelStatsCollector(n, _channel_dim(m)) for n, m in modules.items()}
    handles = [m.register_forward_pre_hook(collectors[n]) for n, m in modules.items()]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    return {n: c.result() for n, c in collectors.items()}
