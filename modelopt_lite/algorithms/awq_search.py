"""AWQ's pure tensor functions: fake-quantized weights, candidate scales, scale and clip searches.

Nothing here walks modules. A weight is a 2-D ``[out, in]`` tensor quantized by a
:class:`~modelopt_lite.config.QuantizerSpec` (per block along ``in``, per output channel, or
per tensor). The scale ``s`` multiplies a weight's input columns (its input is divided by
``s``), so a candidate's effective weight is ``Q(W * s) / s``.

Example::

    s = search_scale(x, w, spec)                     # a single linear on bare tensors
    amin, amax = search_clip(w * s, block_gram(x / s, 128), spec)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import QuantizerSpec
from ..nn import functional as F


def block_width(spec: QuantizerSpec, in_features: int) -> int:
    """The input width sharing one range: the block, or the whole row (per channel / tensor)."""
    return spec.block_size if spec.granularity == "per_block" else in_features


def weight_range(w: torch.Tensor, spec: QuantizerSpec):
    """(amin or None, amax), each ``[out, in // block]`` (per channel: ``[out, 1]``)."""
    if spec.granularity == "per_tensor":
        blocks = w.reshape(1, 1, -1)
    else:
        blocks = F.to_blocks(w, block_width(spec, w.shape[1]))
    if spec.symmetric:
        return None, F.symmetric_amax(blocks, -1, spec.num_bits)
    return blocks.amin(-1), blocks.amax(-1)


def qdq_weight(w: torch.Tensor, spec: QuantizerSpec, amin=None, amax=None) -> torch.Tensor:
    """Quantize-dequantize ``w`` with the given ranges (from ``w`` itself when None)."""
    if amax is None:
        amin, amax = weight_range(w, spec)
    scale, zero = F.scale_zero(amin, amax, spec.num_bits, spec.symmetric, spec.integer_zero)
    zero = None if zero is None else zero.unsqueeze(-1)
    shape = (1, 1, -1) if spec.granularity == "per_tensor" else (
        w.shape[0], amax.shape[-1], -1)
    q = F.quantize(w.reshape(shape), scale.unsqueeze(-1), zero, spec.num_bits, spec.symmetric)
    return F.dequantize(q, scale.unsqueeze(-1), zero).reshape(w.shape).to(w.dtype)


def weight_magnitude(weights: list[torch.Tensor], spec: QuantizerSpec) -> torch.Tensor:
    """Per-input-channel mean of |w| normalised by its block's max, averaged over the linears."""
    out = []
    for w in weights:
        width = block_width(spec, w.shape[1]) if spec.granularity != "per_tensor" else w.shape[1]
        blocks = F.to_blocks(w.float().abs(), width)
        out.append((blocks / blocks.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(w.shape))
    return torch.cat(out).mean(0)


def candidate_scales(x_mag: torch.Tensor, w_mag: torch.Tensor | None, n_grid: int) -> torch.Tensor:
    """``[1 + n_grid, in]``: the identity, then ``x^a / w^(1-a)`` for ``a = i / n_grid``,
    normalised so that ``max * min == 1`` (``w_mag=None``: ``x^a`` only)."""
    x = x_mag.float().clamp(min=1e-4)
    alphas = torch.arange(n_grid, dtype=torch.float32, device=x.device) / n_grid
    s = x[None].pow(alphas[:, None])
    if w_mag is not None:
        s = s / w_mag.float().clamp(min=1e-4)[None].pow(1 - alphas[:, None])
    s = s.clamp(min=1e-4)
    s = s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()
    return torch.cat([torch.ones_like(x)[None], s])


def best_scale(candidates: torch.Tensor, loss: Callable[[torch.Tensor], float]):
    """(the candidate with the lowest ``loss(s)``, all losses)."""
    losses = torch.tensor([float(loss(s)) for s in candidates])
    return candidates[int(losses.argmin())], losses


def scaled_weight(w: torch.Tensor, s: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """The effective weight of candidate ``s``: ``Q(W * s) / s``."""
    s = s.to(w.device, torch.float32)
    return (qdq_weight(w.float() * s, spec).float() / s).to(w.dtype)


def search_scale(x: torch.Tensor, w: torch.Tensor, spec: QuantizerSpec, n_grid: int = 20,
                 duo_scaling: bool = True) -> torch.Tensor:
    """AWQ scale for one linear on bare tensors: minimises ``||x Q(W s)^T / s - x W^T||^2``.

    ``x``: ``[tokens, in]`` activations; ``w``: ``[out, in]``. Returns ``s`` (``[in]``).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ w.float().t()
    w_mag = weight_magnitude([w], spec) if duo_scaling else None
    cands = candidate_scales(x.abs().mean(0), w_mag, n_grid)
    s, _ = best_scale(cands, lambda s: (x @ scaled_weight(w, s, spec).t() - ref).pow(2).mean())
    return s


# --- clipping ---

def block_gram(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[in // width, width, width]``: per-block second moments ``sum_t x_t[b]^T x_t[b]``."""
    x = x.reshape(-1, x.shape[-1]).float()
    xb = x.reshape(x.shape[0], -1, width).transpose(0, 1)  # [nb, T, width]
    return xb.transpose(1, 2) @ xb


def scale_gram(gram: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram of ``x / s`` from the Gram of ``x``."""
    inv = (1.0 / s.float()).reshape(gram.shape[0], -1)
    return gram * inv[:, :, None] * inv[:, None, :]


def clip_ratios(n: int, min_ratio: float) -> torch.Tensor:
    """``n`` shrink ratios from 1 down to ``min_ratio`` (1 first: never worse than no clip)."""
    return torch.linspace(1.0, min_ratio, n)


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, spec: QuantizerSpec,
                ratios: torch.Tensor, rows_per_chunk: int = 256):
    """Per (row, block) shrink of the range minimising that block's output error ``d^T G_b d``.

    ``d = Q_r(w_rb) - w_rb`` with the range scaled by ratio ``r``; ``gram`` from
    :func:`block_gram` of the linear's input. Returns ``(amin or None, amax)`` like
    :func:`weight_range`.
    """
    w = w.float()
    amin, amax = weight_range(w, spec)
    best_amax, best_amin = amax.clone(), None if amin is None else amin.clone()
    gram = gram.to(w.device, torch.float32)
    for r0 in range(0, w.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        err = torch.stack([_clip_error(w[rows], gram, spec, r, amin, amax, rows) for r in ratios])
        pick = err.argmin(0)  # [rows, nb]
        r = ratios.to(w.device)[pick]
        best_amax[rows] = amax[rows] * r
        if amin is not None:
            best_amin[rows] = amin[rows] * r
    return best_amin, best_amax


def _clip_error(w, gram, spec, ratio, amin, amax, rows):
    lo = None if amin is None else amin[rows] * ratio
    d = qdq_weight(w, spec, lo, amax[rows] * ratio) - w
    db = d.reshape(d.shape[0], gram.shape[0], -1).transpose(0, 1)  # [nb, rows, width]
    return ((db @ gram) * db).sum(-1).t()  # [rows, nb]
