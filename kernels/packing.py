"""The one INT4 weight packing, in plain torch.

A linear weight W [N, K] (out x in) is quantized per block of ``group_size`` along K into
unsigned codes u in [0, 15], a scale s [N, K/B] and a zero z [N, K/B]:
``W_hat = (u - z) * s``. Symmetric weights have z == 8.

Packed form (what checkpoints hold and the Triton kernels load):

* ``qweight`` int32 [N, Kp/8], Kp = K rounded up to a multiple of 128 (padding codes are 8).
  K is cut into chunks of 128; chunk c of row n is the 16 words 16c .. 16c+15, and code
  ``k = 128c + 16i + j`` sits in word ``16c + j``, nibble ``i`` (bits 4i .. 4i+3). So nibble i
  of a chunk's 16 words is one 16-wide K slice: the kernel turns each nibble plane into one
  [N, 16] operand of a tensor-core product, with no data reshuffle in registers.
  With ``tile_rows`` R > 0 (what ``deploy`` stores, :func:`tile_words`) the same words are
  laid out tile by tile: row block (R rows; the last may hold fewer), then chunk, then the
  block's rows' 16 words, so that one chunk of a block is one contiguous run of memory (the
  tensor copies of the Hopper kernel read it in one piece; every kernel reads both layouts).
  The tiled layout also swaps bytes inside each pair of neighbouring words (2j, 2j + 1) of a
  chunk (:func:`swap_pair_bytes`): the first word holds the low halves of both (nibbles 0-3 of
  word 2j, then of 2j + 1), the second their high halves, so that byte b of the two words,
  which a tensor-core fragment takes as one register of two columns, is one byte of one word
  (a shift, where the row-by-row words need a byte permute per register).
  The tensor keeps its [N, Kp/8] shape; ``PackedInt4.tile_rows`` says which layout it holds.
* ``scale`` [N, K/B] in the activation dtype.
* ``zterm`` [N, K/B] = ``-z * s`` in the activation dtype (the product with the stored,
  rounded scale, rounded once), or ``None`` for symmetric weights (z = 8), so the zero point
  costs one FMA: ``W_hat = u * s + zterm``.

Integer zero points in [0, 15] (AutoAWQ / GPTQ checkpoints, ``quantize_rtn(...,
integer_zero=True)``) are recovered exactly from (scale, zterm) by :func:`integer_zeros`; the
warp-specialized kernel then reads them as 4-bit words (:func:`zero_words`) instead of a
16-bit zero term, 2.5 instead of 4 bytes per row and block.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

CHUNK = 128
SYMMETRIC_ZERO = 8
TILE_ROWS = 256   # the tiled layout's row block: the Hopper kernel's tallest tile


class PackedInt4(NamedTuple):
    qweight: torch.Tensor          # int32 [N, Kp/8]
    scale: torch.Tensor            # [N, K/B], fp16 or bf16
    zterm: Optional[torch.Tensor]  # [N, K/B] = -zero * scale, or None (symmetric)
    group_size: int
    in_features: int
    tile_rows: int = 0             # 0: row by row; R: tile by tile (tile_words)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.in_features

    def tiled(self, rows: int = TILE_ROWS) -> "PackedInt4":
        """The same weight with its words laid out tile by tile in row blocks of ``rows``
        (:func:`tile_words`; 0: row by row). Itself where the layout is that already."""
        if self.tile_rows == rows:
            return self
        return self._replace(qweight=relayout_words(self.qweight, self.tile_rows, rows),
                             tile_rows=rows)

    def row_words(self) -> torch.Tensor:
        """The packed words row by row, int32 [N, Kp/8] (a new tensor when tiled)."""
        return relayout_words(self.qweight, self.tile_rows, 0)


def padded_k(k: int) -> int:
    return -(-k // CHUNK) * CHUNK


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> int32 [N, Kp/8] in the kernel's chunked nibble order."""
    if codes.dim() != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be [N, K] with K % 8 == 0, got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 15):
        raise ValueError("INT4 codes must lie in 0..15")
    n, k = c.shape
    kp = padded_k(k)
    if kp != k:
        c = torch.cat([c, c.new_full((n, kp - k), SYMMETRIC_ZERO)], dim=1)
    shifts = 4 * torch.arange(8, device=c.device, dtype=torch.int64)
    words = (c.view(n, kp // CHUNK, 8, 16) << shifts.view(1, 1, 8, 1)).sum(2)
    words = words - ((words >> 31) << 32)  # wrap to signed 32-bit
    return words.reshape(n, kp // 8).to(torch.int32)


def unpack_int4(qweight: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """int32 [N, Kp/8] -> uint8 codes [N, in_features]; the inverse of :func:`pack_int4`."""
    n, kw = qweight.shape
    if kw % 16:
        raise ValueError(f"packed INT4 rows must hold a multiple of 16 words, got {kw}")
    w = (qweight.to(torch.int64) & 0xFFFFFFFF).view(n, kw // 16, 1, 16)
    shifts = 4 * torch.arange(8, device=w.device, dtype=torch.int64).view(1, 1, 8, 1)
    codes = ((w >> shifts) & 0xF).reshape(n, kw * 8)
    if in_features is not None and not 0 <= in_features <= kw * 8:
        raise ValueError(f"in_features must be in [0, {kw * 8}] for {kw} words per row, got "
                         f"{in_features}")
    return codes[:, : kw * 8 if in_features is None else in_features].to(torch.uint8)


def check_tile_rows(rows: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0 or rows % 128:
        raise ValueError(f"tile_rows must be a positive multiple of 128 (the kernels' row "
                         f"tiles are 128 or 256 rows), got {rows!r}")


def swap_pair_bytes(q: torch.Tensor) -> torch.Tensor:
    """Words (w0, w1) of each neighbouring pair along the last dimension -> (lo, hi): lo the
    low 16 bits of w0 then of w1, hi the high 16 bits of w0 then of w1. Its own inverse; the
    tiled layout's word pairs (:func:`tile_words`). A new tensor."""
    if q.shape[-1] % 2:
        raise ValueError(f"word pairs need an even last dimension, got {tuple(q.shape)}")
    # a pair is the 16-bit halves (w0 low, w0 high, w1 low, w1 high): transposed as a 2 x 2
    # block they are (w0 low, w1 low, w0 high, w1 high), no arithmetic and no wider copy
    halves = q.contiguous().view(torch.int16).reshape(*q.shape[:-1], -1, 2, 2)
    return halves.transpose(-1, -2).contiguous().view(torch.int32).reshape(q.shape)


def tile_words(qweight: torch.Tensor, rows: int = TILE_ROWS) -> torch.Tensor:
    """Row-by-row words int32 [N, Kp/8] -> the tiled layout, same shape: row blocks of
    ``rows`` rows (the last holds what is left), in each block chunk after chunk, in each
    chunk the block's rows' 16 words, their neighbouring pairs byte-swapped
    (:func:`swap_pair_bytes`). Word j of chunk c of row r0 + r (r0 the block's first row, nb
    its row count) sits at flat index ``r0 Kp/8 + 16 (c nb + r) + j``."""
    return _relayout(qweight, rows, tile=True)


def untile_words(qt: torch.Tensor, rows: int = TILE_ROWS) -> torch.Tensor:
    """The inverse of :func:`tile_words`: int32 [N, Kp/8] row by row."""
    return _relayout(qt, rows, tile=False)


def relayout_words(q: torch.Tensor, src_rows: int, dst_rows: int) -> torch.Tensor:
    """Packed words in row blocks of ``src_rows`` -> row blocks of ``dst_rows`` (either 0: row
    by row; :func:`tile_words`). ``q`` itself where the two agree, else a new tensor."""
    if src_rows == dst_rows:
        return q
    if src_rows and dst_rows:   # tiled to tiled: the pairs stay swapped (chunks move whole)
        return _relayout(_relayout(q, src_rows, tile=False, swap=False), dst_rows, tile=True,
                         swap=False)
    if src_rows:
        return untile_words(q, src_rows)
    return tile_words(q, dst_rows)


def _relayout(q: torch.Tensor, rows: int, tile: bool, swap: bool = True) -> torch.Tensor:
    """Row-by-row words to tiled (``tile``) or back: the whole row blocks in one copy, the
    last partial one in another; the word pairs' bytes swapped (:func:`swap_pair_bytes`)
    unless ``swap`` is off (16-word chunks move whole, so a pair's swap survives the move)."""
    check_tile_rows(rows)
    if q.dim() != 2 or q.shape[1] % 16:
        raise ValueError(f"packed words must be [N, Kp/8] with Kp/8 a multiple of 16, got "
                         f"{tuple(q.shape)}")
    n, kw = q.shape
    q = swap_pair_bytes(q) if swap else q.contiguous()
    out = torch.empty_like(q)
    full = n // rows * rows

    def move(r0: int, r1: int) -> None:
        nb = min(rows, r1 - r0)
        rows_view = (-1, nb, kw // 16, 16)          # [blocks, rows, chunks, 16]
        tiled_view = (-1, kw // 16, nb, 16)         # [blocks, chunks, rows, 16]
        if tile:
            out[r0:r1].view(tiled_view).copy_(q[r0:r1].view(rows_view).transpose(1, 2))
        else:
            out[r0:r1].view(rows_view).copy_(q[r0:r1].view(tiled_view).transpose(1, 2))

    if full:
        move(0, full)
    if full < n:
        move(full, n)
    return out


def check_group_size(group_size: int) -> None:
    """The block sizes the kernels read: 32, 64 or a multiple of 128 (each 128-wide chunk of K
    takes whole blocks, or lies inside one)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
            group_size in (32, 64) or (group_size > 0 and group_size % 128 == 0)):
        raise ValueError(f"the INT4 kernels take block sizes 32, 64 or a multiple of 128, got "
                         f"{group_size!r}; quantize with one of those (128 is the fastest)")


def pack_weight(codes, scale, zero, group_size: int, dtype=torch.float16) -> PackedInt4:
    """Pack the quantizer's (codes, scale, zero) triple; ``zero=None`` means symmetric."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out_features, in_features], got {codes.dim()}-D")
    n, k = codes.shape
    check_group_size(group_size)
    if k % group_size:
        raise ValueError(f"in_features {k} is not divisible by the block size {group_size}; "
                         "pick a block size that divides it or skip this layer")
    if tuple(scale.shape) != (n, k // group_size):
        raise ValueError(f"scale must be [{n}, {k // group_size}], got {tuple(scale.shape)}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
    scale = scale.detach().to(torch.float32).to(dtype).contiguous()
    zterm = None
    if zero is not None:
        if tuple(zero.shape) != tuple(scale.shape):
            raise ValueError(f"zero must match scale {tuple(scale.shape)}, got {tuple(zero.shape)}")
        # from the stored scale: an integer zero then comes back exactly (integer_zeros)
        zterm = (-zero.detach().to(torch.float32) * scale.float()).to(dtype).contiguous()
    return PackedInt4(pack_int4(codes).contiguous(), scale, zterm, int(group_size), int(k))


def cached_layout(cache, key: torch.Tensor, tag, variant, make, build: bool = True):
    """A layout derived from ``key`` (a packed tensor), built by ``make()`` once per
    ``variant`` and kept in ``cache`` (a ``WeakIdKeyDictionary``) while ``key`` lives. ``tag``
    says which contents the layouts were built from (version counters, addresses): a
    different tag drops every variant. ``build=False``: None instead of building."""
    hit = cache.get(key)
    if hit is None or hit[0] != tag:
        if not build:
            return None
        hit = cache[key] = (tag, {})
    if variant not in hit[1]:
        if not build:
            return None
        hit[1][variant] = make()
    return hit[1][variant]


def pair_scales(p: PackedInt4) -> torch.Tensor:
    """int32 [N, K/B]: each block's scale bits in the low half, its zero term's in the high half.

    The large-M kernel reads one 4-byte word per row and block instead of two 2-byte values,
    which lets the compiler stream it with the weights. Symmetric weights get a zero high half.
    """
    lo = p.scale.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    if p.zterm is None:
        return lo.contiguous()
    return (lo | (p.zterm.contiguous().view(torch.int16).to(torch.int32) << 16)).contiguous()


def integer_zeros(p: PackedInt4) -> Optional[torch.Tensor]:
    """uint8 [N, K/B]: the zero points z in [0, 15] for which ``zterm == -z * scale`` rounded
    to the scale's dtype holds for every block (any z where the scale is 0 and the zero term
    too: 0), or None where one block's zero term is no such product (fractional zero points,
    as this toolkit's own min/max quantizers make them) or the weights are symmetric."""
    if p.zterm is None:
        return None
    s, zt = p.scale.float(), p.zterm.float()
    z = torch.where(s != 0, -zt / torch.where(s != 0, s, 1.0), 0.0).round().clamp(0, 15)
    if not torch.equal((-z * s).to(p.zterm.dtype), p.zterm):
        return None
    return z.to(torch.uint8)


def zero_words(z: torch.Tensor) -> torch.Tensor:
    """int32 [ceil(G / 8), N] from zero points z uint8 [N, G]: block g's zero of row n in bits
    4 (g % 8) .. 4 (g % 8) + 3 of word [g // 8, n], so a kernel that walks K reads one word per
    row every 8 blocks and each block's zero with one shift."""
    n, g = z.shape
    z = torch.nn.functional.pad(z.to(torch.int64), (0, -g % 8)).view(n, -1, 8)
    w = (z << (4 * torch.arange(8, device=z.device))).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).t().contiguous()


def dequantize(p: PackedInt4, dtype=torch.float32) -> torch.Tensor:
    """W_hat [N, K] = u * s + zterm (or (u - 8) * s when symmetric), in ``dtype``."""
    u = unpack_int4(p.row_words(), p.in_features).to(torch.float32)
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


def quantize_rtn(w: torch.Tensor, group_size: int, symmetric: bool = False,
                 integer_zero: bool = False):
    """Round-to-nearest block quantization of W [N, K] -> (codes uint8, scale, zero or None).

    A plain reference used by tests and benchmarks; calibrated quantizers live elsewhere.
    Asymmetric uses min/max per block with a float zero (``integer_zero``: rounded to an
    integer in [0, 15], as AutoAWQ and GPTQ store it); symmetric uses absmax/7.5 and z=8.
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
    if integer_zero:
        zero = zero.round().clamp(0, 15)
    codes = torch.round(wb / scale[..., None] + zero[..., None]).clamp(0, 15)
    return codes.reshape(n, k).to(torch.uint8), scale, zero
