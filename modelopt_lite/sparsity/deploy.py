"""Run 2:4-sparse fp16/bf16 linears on sparse tensor cores through ``torch.sparse``.

``to_sparse_semi_structured`` compresses a 2:4 weight to its kept half plus 2-bit indices;
``F.linear`` with such a weight dispatches to cuSPARSELt or CUTLASS sparse GEMMs (NVIDIA
Ampere or newer). Measured on an H100 with torch 2.11 (benchmarks/results/sparse_speed_h100.json):
the CUTLASS path is built for compute capability 8.x only and the cuSPARSELt path costs about
0.6-1 ms per call, 4-35x slower than dense cuBLAS at M <= 1024, so this swap is opt-in and not
part of ``modelopt_lite.deploy``. Only layers that are exactly 2:4 sparse, float (not fake-quant), on CUDA and
of a supported shape are swapped; every other layer is listed with the reason.

Example::

    model = mtl.sparsify(model.half().cuda(), "2:4", method="sparsegpt", calib=...)
    swapped, skipped = deploy_sparse(model)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..nn.quant_modules import is_quantized
from .masks import is_nm_sparse

logger = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16)


def _reason(module: nn.Module) -> str | None:
    w = module.weight
    if not isinstance(module, nn.Linear) or is_quantized(module):
        return f"{type(module).__name__} is not a float nn.Linear"
    if w.device.type != "cuda":
        return "weight is not on a CUDA device"
    if w.dtype not in DTYPES:
        return f"dtype {w.dtype} (sparse tensor cores here take float16 or bfloat16)"
    if w.shape[0] % 64 or w.shape[1] % 64:
        return f"shape {tuple(w.shape)}: both dims must be multiples of 64"
    if not is_nm_sparse(w.detach(), 2, 4):
        return "weight is not 2:4 sparse"
    return None


@torch.no_grad()
def deploy_sparse(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Swap every eligible masked linear's weight for a semi-structured sparse tensor (in place).

    Returns ``(swapped names, {skipped name: reason})``. Inference only: the swapped weights
    no longer train and the ``weight_mask`` buffers stay as a record.
    """
    from torch.sparse import to_sparse_semi_structured

    swapped, skipped = [], {}
    for name, module in model.named_modules():
        if "weight_mask" not in getattr(module, "_buffers", {}):
            continue
        reason = _reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            sparse = to_sparse_semi_structured(module.weight.detach())
        except (RuntimeError, ValueError) as err:
            skipped[name] = f"to_sparse_semi_structured refused it: {err}"
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        swapped.append(name)
    logger.info("deploy_sparse: %d linear(s) on 2:4 sparse kernels, %d skipped", len(swapped),
                len(skipped))
    return swapped, skipped
