"""Keep 2:4 (or any) sparsity masks fixed while fine-tuning.

A sparsified module carries a ``weight_mask`` buffer (same shape as its weight, 0/1). The
training plugins call :func:`mask_grads_` before each optimizer step and :func:`apply_masks_`
after it, so pruned weights stay exactly zero.

Example::

    loss.backward(); mask_grads_(model); optimizer.step(); apply_masks_(model)
"""

from __future__ import annotations

import torch
from torch import nn


def masked_modules(model: nn.Module):
    """(module, mask) for every module with a ``weight_mask`` buffer."""
    out = []
    for name, module in model.named_modules():
        mask = module._buffers.get("weight_mask") if hasattr(module, "_buffers") else None
        if mask is None:
            continue
        if mask.shape != module.weight.shape:
            raise ValueError(f"{name}: weight_mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(module.weight.shape)}; the mask must match the weight")
        out.append((module, mask))
    return out


@torch.no_grad()
def mask_grads_(model: nn.Module) -> int:
    """Zero the gradients of masked-out weights; returns the number of masked modules."""
    pairs = masked_modules(model)
    for module, mask in pairs:
        if module.weight.grad is not None:
            module.weight.grad.mul_(mask.to(module.weight.grad.dtype))
    return len(pairs)


@torch.no_grad()
def apply_masks_(model: nn.Module) -> int:
    """``weight.data.mul_(weight_mask)`` (and the gradient) on every masked module."""
    pairs = masked_modules(model)
    for module, mask in pairs:
        module.weight.data.mul_(mask.to(module.weight.dtype))
        if module.weight.grad is not None:
            module.weight.grad.mul_(mask.to(module.weight.grad.dtype))
    return len(pairs)
