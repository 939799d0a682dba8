"""Quantization primitives: pure functions over tensors, and the one fake-quant autograd function.

Conventions (shared by the fake-quant modules, the checkpoints, the INT4 kernels and export):

* symmetric: ``scale = amax / qmax``, ``q = clamp(round(x / scale), qmin, qmax)``,
  ``x_hat = q * scale`` (int8: q in [-128, 127]; int4: q in [-8, 7]). A *weight's* range
  uses the extra negative level: ``amax = max(max(x), -min(x) * qmax / -qmin)``, so a group
  whose largest magnitude is negative maps it to -8 (int4) with a 1/8 finer step, instead of
  to -7 with a 1/7 step (:func:`symmetric_amax`);
* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = -min / scale`` (a float, so a
  min/max group is reproduced exactly; ``integer_zero``: rounded into [0, 2**bits - 1], as
  AutoAWQ and GPTQ store it, which moves the group's ends by up to half a step but keeps 0
  exactly representable and lets the INT4 kernels read 4-bit zeros),
  ``q = clamp(round(x / scale + zero), 0, 2**bits - 1)``, ``x_hat = (q - zero) * scale``.

Example::

    q, scale, zero = quantize_blockwise(w, block_size=64, num_bits=4, symmetric=False)
    w_hat = dequantize_blockwise(q, scale, zero, block_size=64)
"""

from __future__ import annotations

import torch

EPS = 1e-8


def qrange(num_bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def scale_zero(amin: torch.Tensor | None, amax: torch.Tensor, num_bits: int, symmetric: bool,
               integer_zero: bool = False):
    """Scale (and zero point, None when symmetric) from a range; the zero point is a float,
    or with ``integer_zero`` an integer in the code range (as a float tensor)."""
    qmin, qmax = qrange(num_bits, symmetric)
    if symmetric:
        return amax.float().clamp(min=EPS) / qmax, None
    scale = (amax.float() - amin.float()).clamp(min=EPS) / (qmax - qmin)
    zero = -amin.float() / scale
    if integer_zero:   # rounded, with the range's gradient passed straight through (QAT)
        zero = zero + (zero.round().clamp(qmin, qmax) - zero).detach()
    return scale, zero


def quantize(x: torch.Tensor, scale, zero, num_bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float) of ``x``; broadcasting ``scale``/``zero`` against ``x``."""
    qmin, qmax = qrange(num_bits, symmetric)
    y = x.float() / scale
    if zero is not None:
        y = y + zero
    return torch.clamp(torch.round(y), qmin, qmax)


def dequantize(q: torch.Tensor, scale, zero) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


class FakeQuantFunction(torch.autograd.Function):
    """Quantize-dequantize in the input's dtype, straight-through backward.

    With ``clip_grad`` the gradient is zeroed where the input fell outside the representable
    range (the clipped straight-through estimator); otherwise it passes through unchanged.
    When ``scale`` (or ``zero``) requires grad (learned ranges, LSQ), their gradients follow
    LSQ: ``d x_hat / d scale = q - y`` inside the range and ``q - zero`` where clamped
    (``y = x / scale + zero``); ``d x_hat / d zero = 0`` inside and ``-scale`` where clamped.
    """

    @staticmethod
    def forward(ctx, x, scale, zero, num_bits: int, symmetric: bool, clip_grad: bool = False):
        q = quantize(x, scale, zero, num_bits, symmetric)
        out = dequantize(q, scale, zero).to(x.dtype)
        range_grad = _needs_range_grad(ctx, scale, zero)
        if clip_grad or range_grad:
            qmin, qmax = qrange(num_bits, symmetric)
            y = x.float() / scale + (zero if zero is not None else 0.0)
            inside = (y >= qmin - 0.5) & (y <= qmax + 0.5)
            saved = (inside, q, y, scale, zero) if range_grad else (inside,)
            ctx.save_for_backward(*saved)
        ctx.clip_grad, ctx.range_grad = clip_grad, range_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_scale = grad_zero = None
        if ctx.range_grad:
            inside, q, y, scale, zero = ctx.saved_tensors
            grad_scale, grad_zero = _range_grads(grad.float(), inside, q, y, scale, zero)
        elif ctx.clip_grad:
            (inside,) = ctx.saved_tensors
        if ctx.clip_grad:
            grad = grad * inside
        return grad, grad_scale, grad_zero, None, None, None


def _needs_range_grad(ctx, scale, zero) -> bool:
    needs = ctx.needs_input_grad
    return (torch.is_tensor(scale) and needs[1]) or (torch.is_tensor(zero) and needs[2])


def _range_grads(grad, inside, q, y, scale, zero):
    """LSQ gradients of scale and zero, summed to their (broadcast) shapes."""
    offset = zero if zero is not None else 0.0
    grad_scale = (grad * torch.where(inside, q - y, q - offset)).sum_to_size(scale.shape)
    if zero is None:
        return grad_scale, None
    grad_zero = (grad * torch.where(inside, 0.0, -scale)).sum_to_size(zero.shape)
    return grad_scale, grad_zero


def fake_quant(x, scale, zero, num_bits: int, symmetric: bool, clip_grad: bool = False):
    return FakeQuantFunction.apply(x, scale, zero, num_bits, symmetric, clip_grad)


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two):
    symmetric, entries +-1/sqrt(n), ``H @ H.T = I``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


def rotate_blocks(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ diag(r, r, ..., r)`` on the last dimension: each run of ``r.shape[0]`` channels
    times the same ``[b, b]`` matrix (the last dimension must be a multiple of ``b``)."""
    b = r.shape[0]
    if x.shape[-1] % b:
        raise ValueError(f"cannot rotate {x.shape[-1]} channels in blocks of {b}")
    return (x.unflatten(-1, (-1, b)) @ r.to(x.dtype)).flatten(-2)


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[rows, K] -> [rows, K // block_size, block_size]; K must be a multiple of the block."""
    rows, k = w.shape
    if k % block_size:
        raise ValueError(f"input dim {k} is not divisible by block size {block_size}")
    return w.reshape(rows, k // block_size, block_size)


def symmetric_amax(x: torch.Tensor, dim, num_bits: int, keepdim: bool = False) -> torch.Tensor:
    """The symmetric range of a weight that uses all of [qmin, qmax]: the smallest ``amax``
    with ``max(x) <= amax`` and ``-min(x) <= amax * (-qmin) / qmax``, i.e. both extremes land
    on the grid ``scale = amax / qmax`` without clipping."""
    qmin, qmax = qrange(num_bits, True)
    hi = x.amax(dim=dim, keepdim=keepdim)
    lo = x.amin(dim=dim, keepdim=keepdim)
    return torch.maximum(hi, -lo * (qmax / -qmin)).clamp(min=0)


def block_range(w: torch.Tensor, block_size: int, symmetric: bool, num_bits: int):
    """(amin or None, amax) per (row, block) of a 2-D weight, each [rows, K // block]."""
    blocks = to_blocks(w, block_size)
    if symmetric:
        return None, symmetric_amax(blocks, -1, num_bits)
    return blocks.amin(-1), blocks.amax(-1)


def quantize_blockwise(w: torch.Tensor, block_size: int, num_bits: int, symmetric: bool,
                       integer_zero: bool = False):
    """Blockwise quantization of a 2-D weight along its input dim -> (q, scale, zero)."""
    amin, amax = block_range(w, block_size, symmetric, num_bits)
    scale, zero = scale_zero(amin, amax, num_bits, symmetric, integer_zero)
    zb = zero.unsqueeze(-1) if zero is not None else None
    q = quantize(to_blocks(w, block_size), scale.unsqueeze(-1), zb, num_bits, symmetric)
    return q.reshape(w.shape), scale, zero


def dequantize_blockwise(q, scale, zero, block_size: int) -> torch.Tensor:
    zb = zero.unsqueeze(-1) if zero is not None else None
    return dequantize(to_blocks(q, block_size), scale.unsqueeze(-1), zb).reshape(q.shape)
