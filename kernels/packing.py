"""The one INT4 weight packing, in plain torch.

A linear weight W [N, K] (out x in) is quantized per block of ``group_size`` along K into
unsigned codes u in [0, 15], a scale s [N, K/B] and a zero z [N, K/B]:
``W_hat = (u - z) * s``. Symmetric weights have z == 8.

Packed form (what checkpoints hold and the Triton kernels load):

* ``qweight`` int32 [N, K/8]: word j of row n holds codes k = 8j .. 8j+7. Code 8j+e sits in
  nibble ``NIBBLE_OF[e] = (0, 4, 1, 5, 2, 6, 3, 7)[e]``, i.e. at bit ``4 * NIBBLE_OF[e]``.
  With this order ``(w >> 4r) & 0x000F000F`` holds codes (2r, 2r+1) in its two 16-bit halves,
  so one LOP3 with 0x64006400 (fp16) or 0x43004300 (bf16) builds two half-precision values
  ``magic + u`` at once (the FasterTransformer interleave).
* ``scale`` [N, K/B] in the activation dtype.
* ``zterm`` [N, K/B] = ``-z * s`` in the activation dtype, or ``None`` for symmetric
  weights (z = 8), so the zero point costs one FMA: ``W_hat = u * s + zterm``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

NIBBLE_OF = (0, 4, 1, 5, 2, 6, 3, 7)
SYMMETRIC_ZERO = 8


class PackedInt4(NamedTuple):
    qweight: torch.Tensor          # int32 [N, K/8]
    scale: torch.Tensor            # [N, K/B], fp16 or bf16
    zterm: Optional[torch.Tensor]  # [N, K/B] = -zero * scale, or None (symmetric)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8


def _shifts(device) -> torch.Tensor:
    return torch.tensor([4 * p for p in NIBBLE_OF], dtype=torch.int32, device=device)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> int32 [N, K/8] in the kernel's nibble order."""
    if codes.dim() != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be [N, K] with K % 8 == 0, got {tuple(codes.shape)}")
    if codes.dtype not in (torch.uint8, torch.int32, torch.int64, torch.int16, torch.int8):
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise ValueError("INT4 codes must lie in 0..15")
    n, k = c.shape
    words = (c.view(n, k // 8, 8) << _shifts(c.device).to(torch.int64)).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # wrap to signed 32-bit


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> uint8 codes [N, K]; the inverse of :func:`pack_int4`."""
    n, kw = qweight.shape
    w = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> _shifts(w.device).to(torch.int64)) & 0xF
    return codes.reshape(n, kw * 8).to(torch.uint8)


def pack_weight(codes, scale, zero, group_size: int, dtype=torch.float16) -> PackedInt4:
    """Pack the quantizer's (codes, scale, zero) triple; ``zero=None`` means symmetric."""
    n, k = codes.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features {k} is not divisible by the block size {group_size}; "
                         "pick a block size that divides it or skip this layer")
    if tuple(scale.shape) != (n, k // group_size):
        raise ValueError(f"scale must be [{n}, {k // group_size}], got {tuple(scale.shape)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
    scale32 = scale.detach().to(torch.float32)
    zterm = None
    if zero is not None:
        if tuple(zero.shape) != tuple(scale.shape):
            raise ValueError(f"zero must match scale {tuple(scale.shape)}, got {tuple(zero.shape)}")
        zterm = (-zero.detach().to(torch.float32) * scale32).to(dtype).contiguous()
    return PackedInt4(pack_int4(codes).contiguous(), scale32.to(dtype).contiguous(), zterm,
                      int(group_size))


def dequantize(p: PackedInt4, dtype=torch.float32) -> torch.Tensor:
    """W_hat [N, K] = u * s + zterm (or (u - 8) * s when symmetric), in ``dtype``."""
    u = unpack_int4(p.qweight).to(torch.float32)
    s = p.scale.to(torch.float32).repeat_interleave(p.group_size, dim=1)
    if p.zterm is None:
        return ((u - SYMMETRIC_ZERO) * s).to(dtype)
    return (u * s + p.zterm.to(torch.float32).repeat_interleave(p.group_size, dim=1)).to(dtype)


def w4a16_reference(x: torch.Tensor, p: PackedInt4, bias=None, pre_scale=None) -> torch.Tensor:
    """y = (x * pre_scale) @ W_hat^T + bias, computed in float32, returned in x.dtype."""
    xf = x.to(torch.float32)
    if pre_scale is not None:
        xf = xf * pre_scale.to(torch.float32)
    y = xf @ dequantize(p, torch.float32).to(x.device).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def quantize_rtn(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """Round-to-nearest block quantization of W [N, K] -> (codes uint8, scale, zero or None).

    A plain reference used by tests and benchmarks; calibrated quantizers live elsewhere.
    Asymmetric uses min/max per block with a float zero; symmetric uses absmax/7.5 and z=8.
    """
    n, k = w.shape
    wb = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        scale = (wb.abs().amax(-1) / 7.5).clamp_min(1e-8)
        codes = torch.round(wb / scale[..., None] + SYMMETRIC_ZERO).clamp(0, 15)
        return codes.reshape(n, k).to(torch.uint8), scale, None
    lo, hi = wb.amin(-1), wb.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = -lo / scale
    codes = torch.round(wb / scale[..., None] + zero[..., None]).clamp(0, 15)
    return codes.reshape(n, k).to(torch.uint8), scale, zero
