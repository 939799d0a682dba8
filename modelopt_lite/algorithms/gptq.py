"""GPTQ rounding (Frantar et al., 2022) on fixed quantization ranges.

Given a weight ``W`` ``[out, in]``, its quantization ranges (per output row and input block,
e.g. from AWQ's clip search) and the Hessian ``H = 2 X^T X / n`` of its calibration inputs,
the columns are rounded one at a time and each column's rounding error is spread over the
columns not yet rounded through the upper Cholesky factor ``U`` of ``H^-1`` (the OBS update),
so the layer output ``X W^T`` changes less than with round-to-nearest. The ranges do not
move: the result lies exactly on the grid the quantizer already holds, so the format and the
export are those of plain RTN / AWQ weights.

``act_order`` rounds the columns with the largest ``H_jj`` first; each column keeps the range
of the block it belongs to ("static groups"), so the blocks stay contiguous in the file.

Example::

    acc = HessianAccumulator(in_features=640)
    acc.add(x)                                   # every calibration batch
    amin, amax = weight_range(w, spec)           # or searched ranges
    w_q = gptq_round(w, acc.hessian(), spec, amin, amax)
    assert torch.equal(qdq_weight(w_q, spec, amin, amax), w_q)
"""

from __future__ import annotations

import os

import torch

from ..config import QuantizerSpec
from ..nn import functional as F
from ..sparsity.sparsegpt import _few_threads, _inverse_cholesky_upper
from ..summary import sqnr_db
from .awq_search import block_width


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, spec: QuantizerSpec, amin: torch.Tensor | None,
               amax: torch.Tensor, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = True, mask: torch.Tensor | None = None,
               consume: bool = False) -> torch.Tensor:
    """Round ``w`` (2-D ``[out, in]``) onto the grid of ``(amin, amax)`` with GPTQ updates.

    ``amax`` (and ``amin``, None when symmetric) are ``[out, in // block]`` as
    :func:`~modelopt_lite.algorithms.awq_search.weight_range` returns them (``[out, 1]`` per
    channel). ``h``: the ``[in, in]`` Hessian. ``block_size`` is GPTQ's lazy-update width, not
    the quantization block. ``mask`` (bool ``[out, in]``, e.g. a 2:4 sparsity mask): weights
    where it is False are set to 0 and their error is spread like any other. Returns the
    rounded weight in ``w``'s dtype. ``consume=True``: ``h`` may be overwritten (one
    ``[in, in]`` copy less).
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    if spec.granularity == "per_tensor":
        raise ValueError("gptq_round needs per-channel or per-block weight ranges")
    width = block_width(spec, in_f)
    scale, zero = F.scale_zero(amin, amax, spec.num_bits, spec.symmetric,
                               spec.integer_zero)  # [out, nb]
    col_block = torch.arange(in_f, device=w.device) // width
    col_scale = scale.t()[col_block].contiguous()                          # [in, out]
    col_zero = None if zero is None else zero.t()[col_block].contiguous()
    keep = None if mask is None else mask.detach().t().to(w.device, torch.bool).contiguous()

    # transposed, [in, out]: each input column is a contiguous row; float64 in, float64 math
    dtype = torch.float64 if torch.float64 in (w.dtype, h.dtype) else torch.float32
    W = w.detach().to(dtype).t().contiguous()
    H = h.detach().to(w.device, dtype)
    if not consume and H.data_ptr() == h.data_ptr():   # (H is changed in place below)
        H = H.clone()
    col_scale = col_scale.to(dtype)
    col_zero = None if col_zero is None else col_zero.to(dtype)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H, col_scale = W[perm], H[perm][:, perm], col_scale[perm]
        col_zero = None if col_zero is None else col_zero[perm]
        keep = None if keep is None else keep[perm]
    U = _inverse_cholesky_upper(H, percdamp)
    del H
    Q = torch.empty_like(W)
    fused = _use_kernel(W, block_size)
    if fused:   # the column loop in one kernel launch (modelopt_lite.kernels.gptq)
        from ..kernels.gptq import gptq_round_block

        qmin, qmax = F.qrange(spec.num_bits, spec.symmetric)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        z1 = None if col_zero is None else col_zero[i1:i2]
        k1 = None if keep is None else keep[i1:i2]
        if fused:
            err = gptq_round_block(W[i1:i2], U[i1:i2, i1:i2], Q[i1:i2], col_scale[i1:i2], z1,
                                   qmin, qmax, k1)
        else:
            with _few_threads(W.device):
                err = _round_block(W[i1:i2], U[i1:i2, i1:i2], Q[i1:i2], col_scale[i1:i2], z1,
                                   spec, k1)
        if i2 < in_f:
            W[i2:] -= U[i1:i2, i2:].t() @ err
    if perm is not None:
        Q = Q[torch.argsort(perm)]
    return Q.t().contiguous().to(w.dtype)


def _use_kernel(W: torch.Tensor, block_size: int) -> bool:
    """The Triton column loop serves float32 CUDA weights (the PyTorch loop launches ~10
    kernels a column); ``MODELOPT_LITE_GPTQ_KERNEL=0`` keeps the PyTorch loop."""
    if not (W.is_cuda and W.dtype == torch.float32 and block_size <= 128):
        return False
    if os.environ.get("MODELOPT_LITE_GPTQ_KERNEL", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _round_block(w1, u1, q1, scale1, zero1, spec, keep1=None):
    """Round one block's columns in place into ``q1``; return the scaled errors ``[cols, out]``."""
    err1 = torch.empty_like(w1)
    for i in range(w1.shape[0]):
        z = None if zero1 is None else zero1[i]
        q = F.dequantize(F.quantize(w1[i], scale1[i], z, spec.num_bits, spec.symmetric),
                         scale1[i], z)
        if keep1 is not None:
            q = q * keep1[i]
        q1[i] = q
        e = (w1[i] - q) / u1[i, i]
        err1[i] = e
        if i + 1 < w1.shape[0]:
            w1[i + 1:].sub_(u1[i, i + 1:, None] * e[None])
    return err1


@torch.no_grad()
def gptq_round_linears(members, h: torch.Tensor, percdamp: float = 0.01,
                       consume: bool = False) -> None:
    """GPTQ-round the weights of quantized linears that share one input (Hessian ``h``) onto
    the ranges their weight quantizers hold, rows stacked (one factorisation), in place.
    2:4-pruned weights stay 0. ``consume=True``: ``h`` may be overwritten."""
    q0 = members[0].weight_quantizer
    w = torch.cat([m.weight_2d().detach() for m in members])
    if not bool(torch.isfinite(w).all()):
        bad = next(getattr(m, "layer_name", "") or type(m).__name__ for m in members
                   if not bool(torch.isfinite(m.weight_2d()).all()))
        raise ValueError(f"{bad}: the weight holds NaN or Inf values, which GPTQ cannot round "
                         "(they would spread over the whole row). Fix: check the checkpoint, "
                         "or exclude the layer")
    amax = torch.cat([m.weight_quantizer.amax for m in members])
    amin = None if q0.amin is None else torch.cat([m.weight_quantizer.amin for m in members])
    w_q = gptq_round(w, h, q0.spec, amin, amax, percdamp=percdamp, mask=_stacked_mask(members),
                     consume=consume)
    rows = [m.weight_2d().shape[0] for m in members]
    for m, part, orig in zip(members, w_q.split(rows), w.split(rows)):
        m.weight.data.copy_(m.weight_from_2d(part.to(m.weight.dtype)))
        # the weight now lies on the quantization grid: keep its error against the float weight
        # GPTQ started from, for the end-of-run report (quantizing it again would read 0)
        m._weight_sqnr_db = sqnr_db(orig, part)


def _stacked_mask(members) -> torch.Tensor | None:
    """The members' sparsity masks stacked like their weights (None when none is sparse)."""
    masks = [m.mask_2d() for m in members]
    if all(k is None for k in masks):
        return None
    return torch.cat([torch.ones_like(m.weight_2d(), dtype=torch.bool) if k is None else k.bool()
                      for m, k in zip(members, masks)])


__all__ = ["gptq_round", "gptq_round_linears"]
