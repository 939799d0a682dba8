"""Launch wrapper for the W4A16 kernel: input checks, config choice by M, split-K buffer."""
from __future__ import annotations

import functools
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .packing import (PackedInt4, cached_layout, check_group_size, check_tile_rows,
                      integer_zeros, pair_scales, zero_words)
from .tuning import WS_FUSED_TILE, _num_sms, pick_config

_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None):
    n, k = p.shape
    check_group_size(p.group_size)
    if p.tile_rows:
        check_tile_rows(p.tile_rows)
    if not all(t is None or t.is_contiguous() for t in (p.qweight, p.scale, p.zterm)):
        raise ValueError("the packed weight's qweight / scale / zterm must be contiguous: build "
                         "it with pack_weight()")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}] (one per output feature), got {tuple(bias.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the INT4 weight expects {k}")
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if p.scale.dtype != x.dtype:
        raise TypeError(f"scale dtype {p.scale.dtype} differs from activation dtype {x.dtype}; "
                        "pack the weight with dtype=x.dtype")
    if p.qweight.device != x.device:
        raise ValueError(f"x is on {x.device}, the INT4 weight on {p.qweight.device}")


def w4a16_matmul(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias) with the Triton kernel; x [..., K] fp16/bf16 -> [..., N].

    ``config`` overrides the per-GPU table / heuristic (:func:`~.tuning.pick_config`). Configs
    with ``PAIRS`` (the H100 table's large-M rows, the heuristic's at K >= 8192) read a copy of
    the scales and zero terms packed one word per block (:func:`~.packing.pair_scales`), built
    on the first such call and kept while ``p.scale`` lives: 4 bytes per row and block, 1/16 of
    the packed weight (``PAIRS: 2``, fused kernel: the same words transposed, [K/B, N], in a
    second cached copy). ``XPERM`` (small-M path) permutes x per call, by default in one kernel
    that also zeroes the split-K buffer (``PREP``). ``OUT16`` (fp16 activations, any path): the
    split-K partial sums are added with fp16 atomics straight into the output, instead of a
    float32 buffer and a conversion pass. On Hopper the split outputs (fp16 or float32) of the
    WS and ``MMA`` kernels are zeroed by a kernel they overlap (:mod:`~.pdl`; not with
    ``XPERM`` + ``PREP``, whose prep kernel zeroes them). ``PARTNER`` (``MMA`` on tiled words):
    each byte's PRMT names both words of its pair, which the selector reads one of; the same
    instructions, a register allocation like the row-by-row words' (``mma_regs.py``).
    ``MAXNREG`` (GEMV and ``MMA``): registers per thread capped at launch, so that more programs
    share an SM.
    ``DEQUANT`` configs allocate an fp16 copy of the weight per call. ``WS`` (Hopper, block 128): the warp-specialized Gluon kernel
    (:mod:`~.ws`; ``BM``, ``BN``, ``STAGES``, ``GROUP_N``, ``SPLIT_K``, ``PERSIST``, ``STREAM``,
    ``TILED``, ``COAL``, ``MAXNREG``, ``WGS``, ``WPERM``, ``GATHER``, ``SCALES``:
    :func:`ws_scales`); where it cannot run (another GPU, the interpreter, block 32 / 64, K not
    a multiple of 128) the fused kernel takes the same config.

        >>> y = w4a16_matmul(x, packed)                              # doctest: +SKIP
        >>> y = w4a16_matmul(x, packed, config=dict(BM=64, BN=128, SPLIT_K=1, num_warps=8,
        ...                  num_stages=4, FUSE_K=True, PAIRS=True))  # doctest: +SKIP
    """
    from .gemv import w4a16_gemv_kernel
    from .mma import w4a16_mma_kernel
    from .pdl import launch_options, zero_
    from .ptx import mma_constraints, mma_fs_constraints
    from .w4a16 import w4a16_kernel

    _check(x, p, bias)
    if bias is not None and not bias.is_contiguous():   # the kernels index it as [N]
        bias = bias.contiguous()
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device: a layer on another GPU (device_map="auto")
        # runs there, with that device's stream
        with torch.cuda.device(x.device):
            return w4a16_matmul(x, p, bias, config)
    n, k = p.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)
    rows = _MAX_ELEMENTS // max(n, k)
    if m > rows:  # the kernels index x and the output with 32-bit offsets: row blocks
        return torch.cat([w4a16_matmul(x2[i:i + rows], p, bias, config)
                          for i in range(0, m, rows)]).reshape(out_shape)
    cfg = dict(config) if config else pick_config(m, n, k, p.group_size, x.device)
    if cfg.get("WS", False):
        from .ws import w4a16_ws, ws_supported

        if not _interpreting() and ws_supported(x2, p, cfg):
            compact = cfg.get("SCALES", "compact" if m <= 8 else "pairs") == "compact"
            y = w4a16_ws(x2, p, ws_scales(p, compact), bias, cfg)
            return y.reshape(out_shape)
        cfg = _ws_fallback(cfg)  # the fused kernel with the same tile
    if cfg.get("DEQUANT", False):  # large M: dequantize once, then one cuBLAS GEMM
        w = dequantize_fp(p, x.dtype, cfg)
        return torch.nn.functional.linear(x2, w, bias).reshape(out_shape)
    if "BN" not in cfg:
        raise ValueError(f"config {cfg} has no BN (rows per program); a config names at least BN "
                         "and one path (GEMV, MMA, FUSE_K with BM, DEQUANT or WS): see "
                         "kernels/configs/h100.json")
    split_k = max(1, min(int(cfg.get("SPLIT_K", 1)), triton_cdiv(k, 128)))
    gemv = cfg.get("GEMV", False)
    mma = cfg.get("MMA", False)
    atomic = split_k > 1
    # split-K partials are added with float32 atomics, or (OUT16, fp16 only) straight into the
    # half-precision output, which saves the float32 buffer's conversion pass
    out16 = atomic and cfg.get("OUT16", False) and x.dtype == torch.float16
    acc_dtype = torch.float32 if atomic and not out16 else x.dtype
    out = torch.empty((m, n), device=x.device, dtype=acc_dtype)
    # XPERM with PREP: one kernel permutes x and zeroes the split-K output; else zeroed here
    prep = mma and cfg.get("XPERM", False) and cfg.get("PREP", True)
    if atomic and not prep and not mma:
        out.zero_()
    args = (x2, p.qweight, p.scale, p.zterm if p.zterm is not None else p.scale,
            bias if bias is not None else p.scale, out,
            m, n, k, x2.stride(0), out.stride(0), k // p.group_size, split_k)
    common = dict(GROUP=p.group_size, BN=cfg["BN"], HAS_ZERO=p.zterm is not None,
                  HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16,
                  USE_ASM=cfg.get("USE_ASM", True) and not _interpreting(),
                  EVEN_K=k % 128 == 0, ATOMIC=atomic, TR=p.tile_rows,
                  num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    if mma:  # up to 16 tokens per program, one dequantization per word for all of them
        nw = cfg.get("num_warps", 4)
        rows = cfg["BN"] // (8 * nw)     # rows per thread in the [BN, 16] word tile's layout
        if rows not in (2, 4) or cfg["BN"] != 8 * rows * nw:
            raise ValueError(f"MMA configs need BN = 16 or 32 * num_warps, got BN={cfg['BN']}, "
                             f"num_warps={nw}")
        use_asm = common["USE_ASM"]
        n_tiles = 1 if m <= 8 else 2
        xperm = bool(cfg.get("XPERM", False))
        if xperm:  # activations re-laid out once per call for 16-byte fragment loads
            xp = (_xperm_prep(x2, 8 * n_tiles, out if atomic else None) if prep
                  else permute_x(x2, 8 * n_tiles))
            args = (xp,) + args[1:]
        # FS: scales applied in float32 after the products (one group per chunk: block >= 128)
        fs = int(cfg.get("FS", 0)) if p.group_size >= 128 else 0
        sv = _scale_vector(cfg, p, split_k, use_asm)
        # PARTNER: on tiled words the gather names both words of a pair (ptx._prmt_ptx), as the
        # row-by-row gather does; ptxas then allocates registers as for those (mma_regs.py)
        swapped = p.tile_rows > 0
        partner = swapped and bool(cfg.get("PARTNER", False))
        if not use_asm:
            asm, cons = "", ""
        elif fs:
            asm = _mma_fs_asm(x.dtype == torch.bfloat16, p.zterm is not None, n_tiles,
                              k % 128 == 0, rows, xperm, fs == 2, swapped, partner)
            cons = mma_fs_constraints(rows)
        else:
            asm = _mma_asm(x.dtype == torch.bfloat16, p.zterm is not None, p.group_size,
                           n_tiles, k % 128 == 0, rows, xperm, swapped, partner)
            cons = mma_constraints(rows)
        grid = (triton_cdiv(m, 16), split_k, triton_cdiv(n, cfg["BN"]))
        # PAIRS: one 8- / 16-byte load brings the SV chunks' scales and zterms (zero points only)
        pairs = bool(cfg.get("PAIRS", False)) and sv > 1 and p.zterm is not None
        if pairs:
            args = args[:2] + (_pairs(p),) + args[3:]
        # the output zeroed last: a PDL launch follows its zeroing kernel directly (kernels.pdl)
        pdl = zero_(out) if atomic and not prep else False
        w4a16_mma_kernel[grid](*args, **launch_options(pdl),
                               PREFETCH=cfg.get("PREFETCH", False), ASM=asm, CONSTRAINTS=cons,
                               ROWS=rows, FS=fs if use_asm else 0,
                               QC=cfg.get("QC", ""), QE=cfg.get("QE", ""), SV=sv, PAIRS=pairs,
                               DOT_F32=_interpreting() and x.dtype == torch.bfloat16,
                               XTB=8 * n_tiles if xperm else 0, PIPE=_pipe(cfg), **common,
                               **_maxnreg(cfg))
    elif gemv:  # one token per program along grid axis 0
        k_fast = cfg.get("K_FAST", True)
        persist = int(cfg.get("PERSIST", 0))
        if persist:  # PERSIST programs per SM (or PROGRAMS in all), each walking many items
            items = triton_cdiv(n, cfg["BN"]) * split_k
            programs = int(cfg.get("PROGRAMS", 0)) or persist * _num_sms(x.device)
            grid = (m, max(1, min(items, programs)))
        elif k_fast:
            grid = (m, split_k, triton_cdiv(n, cfg["BN"]))
        else:
            grid = (m, triton_cdiv(n, cfg["BN"]), split_k)
        w4a16_gemv_kernel[grid](*args, PREFETCH=cfg.get("PREFETCH", False), K_FAST=k_fast,
                                PERSIST=bool(persist), AHEAD=int(cfg.get("AHEAD", 1)),
                                PIPE=_pipe(cfg), QC=cfg.get("QC", ""), QE=cfg.get("QE", ""),
                                **common, **_maxnreg(cfg))
    else:
        # the token tile is at most the tokens rounded up to a power of two (>= 16): a half-empty
        # tile only costs, and Triton 3.6 miscompiles the BM = 256, 3-stage tile for M == 1
        # (an integer argument of 1 is specialized as a constant) with block 32 (NaN; NOTES.md)
        bm = min(cfg["BM"], max(16, 1 << (m - 1).bit_length()))
        grid = (triton_cdiv(n, cfg["BN"]) * triton_cdiv(m, bm), split_k)
        pairs = int(cfg.get("PAIRS", 0))
        if pairs:  # scale and zero term of a block as one 32-bit word (4-byte, streamed loads);
            # PAIRS 2: those words transposed, [K/B, N] (coalesced across the row tile)
            args = args[:2] + (_pairs(p, transposed=pairs == 2),) + args[3:]
        w4a16_kernel[grid](
            *args, BM=bm, GROUP_N=cfg.get("GROUP_N", 8),
            DOT_F32=_interpreting() and x.dtype == torch.bfloat16,
            FUSE_K=cfg.get("FUSE_K", False), PAIRS=pairs, **common)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(out_shape)


_MAX_ELEMENTS = 2**31 - 1   # int32 offsets: M x max(N, K) per kernel call


def _ws_fallback(cfg: dict) -> dict:
    """A ``WS`` config for the fused kernel, where the warp-specialized one cannot run: its tile
    (BM, BN, GROUP_N) with the fused kernel's defaults for what it leaves out, and BM at most
    128 with BN 256 (as ``ws.w4a16_ws`` caps it; the fused 256 x 256 tile does not fit)."""
    out = dict(WS_FUSED_TILE, **cfg)
    # a table row tuned from a small-M config keeps that path's keys under WS: the fused kernel
    # takes the tile, with its own warps and stages
    if bool(out.pop("MMA", False)) | bool(out.pop("GEMV", False)):
        out.update(num_warps=WS_FUSED_TILE["num_warps"], num_stages=WS_FUSED_TILE["num_stages"])
    # a persistent row's SPLIT_K was never tuned with it; a stream-K row keeps the fused split
    out["SPLIT_K"] = 1 if out.get("PERSIST") and not out.get("STREAM") else out.get("SPLIT_K", 1)
    out.pop("PERSIST", None)   # the fused kernel's PERSIST / STREAM keys mean nothing here
    out.pop("STREAM", None)
    out.pop("TILED", None)
    if out["BN"] == 256:
        out["BM"] = min(out["BM"], 128)
    return out


_PAIR_CACHE = WeakIdKeyDictionary()


def _scale_tag(p: PackedInt4) -> tuple:
    """What the layouts in ``_PAIR_CACHE`` were built from: the scale's version counter and
    the zero term's identity and version. One tag for every variant (a different tag drops
    them all: :func:`~.packing.cached_layout`)."""
    zterm = p.zterm
    return p.scale._version, None if zterm is None else (id(zterm), zterm._version)


def _pairs(p: PackedInt4, transposed: bool = False) -> torch.Tensor:
    """:func:`pair_scales` of ``p`` ([N, K/B], or [K/B, N] ``transposed``), built once per
    scale tensor and layout and kept while the scales live.

    Rebuilt when the scale or zero term changed in place (their version counters) or when the
    zero term is another tensor; costs 4 bytes per row and block (1/16 of the packed words).
    """
    def make():
        sz = pair_scales(p)
        return sz.t().contiguous() if transposed else sz

    return cached_layout(_PAIR_CACHE, p.scale, _scale_tag(p), transposed, make)


ENV_WS_SCALES = "MODELOPT_LITE_WS_SCALES"


def ws_scales(p: PackedInt4, compact: bool = True) -> tuple:
    """The scale layout the warp-specialized kernel reads, ``(mode, scales, zeros)``, built once
    per scale tensor (as :func:`_pairs`):

    - mode 1, symmetric weights: the scales transposed, [K/B, N], 2 bytes per row and block;
    - mode 2, integer zero points (:func:`~.packing.integer_zeros`): those scales and the
      zeros as 4-bit :func:`~.packing.zero_words` [ceil(K/B / 8), N], 2.5 bytes;
    - mode 0, otherwise (fractional zero points, or N not a multiple of 8, which the 16-bit
      rows' tensor copies need): :func:`_pairs` transposed, 4 bytes, and zeros None.

    On the large Llama layers the 1.5 bytes saved per row and block are 2.2 % of the bytes a
    small-batch product streams: 28672x8192 at M = 1 ran 2.1 % faster on an H100, but at
    M = 16-64, where the kernel is bound by its dequantization, the zeros' unpacking made it
    2-5 % slower (benchmarks/kernels/NOTES.md, v37). So ``w4a16_matmul`` asks for it
    (``compact``) at M <= 8 only, unless the config's ``SCALES`` says "compact" or "pairs".
    ``MODELOPT_LITE_WS_SCALES=pairs`` reads mode 0 always (read at each call, so at CUDA-graph
    capture). A model served at both small and large M keeps both layouts: up to 2.5 more
    bytes per row and block beside the pairs' 4 (the packed words take 64)."""
    layout = None
    if compact and os.environ.get(ENV_WS_SCALES, "") != "pairs" and p.shape[0] % 8 == 0:
        def make():
            z = integer_zeros(p)
            if p.zterm is not None and z is None:
                return None
            return (1 if z is None else 2), p.scale.t().contiguous(), \
                None if z is None else zero_words(z)

        # under CUDA-graph capture a layout would only be recorded, not made (and the zero
        # points' check reads the device): use one made before, else the pairs
        capturing = p.scale.is_cuda and torch.cuda.is_current_stream_capturing()
        layout = cached_layout(_PAIR_CACHE, p.scale, _scale_tag(p), "ws", make,
                               build=not capturing)
    return layout if layout is not None else (0, _pairs(p, transposed=True), None)


def dequantize_fp(p: PackedInt4, dtype=torch.float16, config: dict | None = None) -> torch.Tensor:
    """W_hat [N, K] in fp16/bf16 with the Triton dequantization kernel (same arithmetic as the
    GEMM's: u * s + zterm rounded once per weight)."""
    from .dequant import w4a16_dequant_kernel

    if p.scale.dtype != dtype:
        raise TypeError(f"scale dtype {p.scale.dtype} differs from {dtype}")
    cfg = config or {}
    n, k = p.shape
    w = torch.empty((n, k), device=p.qweight.device, dtype=dtype)
    bn, chunks = cfg.get("DQ_BN", 32), cfg.get("DQ_CHUNKS", 4)
    kt = triton_cdiv(k, 128)
    w4a16_dequant_kernel[(triton_cdiv(n, bn), triton_cdiv(kt, chunks))](
        p.qweight, p.scale, p.zterm if p.zterm is not None else p.scale, w,
        n, k, k // p.group_size, chunks,
        GROUP=p.group_size, BN=bn, HAS_ZERO=p.zterm is not None,
        IS_BF16=dtype == torch.bfloat16, USE_ASM=not _interpreting(), EVEN_K=k % 128 == 0,
        TR=p.tile_rows, num_warps=cfg.get("DQ_WARPS", 4), num_stages=2)
    return w


def _xperm_prep(x2: torch.Tensor, tb: int, out: torch.Tensor | None) -> torch.Tensor:
    """:func:`permute_x` of ``x2`` by one Triton kernel, which also zeroes ``out`` (if given)."""
    from .mma import xperm_prep_kernel

    m, k = x2.shape
    mb, kt = triton_cdiv(m, tb), triton_cdiv(k, 128)
    xp = torch.empty((mb, kt, 4, tb, 4, 2, 4), device=x2.device, dtype=x2.dtype)
    block = 1024
    n_out = out.numel() if out is not None else 0
    per_prog = triton_cdiv(triton_cdiv(n_out, mb * kt), block) * block
    xperm_prep_kernel[(mb, kt)](x2, xp, out if out is not None else xp, m, k, x2.stride(0),
                                n_out, per_prog, TB=tb, BLOCK=block, num_warps=4)
    return xp


def permute_x(x2: torch.Tensor, tb: int) -> torch.Tensor:
    """x [M, K] in the order the MMA path's B fragments are read with 16-byte loads (``XPERM``).

    M is zero-padded to a multiple of ``tb`` (8 or 16 tokens, one or two MMA token tiles) and K
    to a multiple of 128. With k = 128 kt + 32 j + 16 h + 4 t + e (plane i = 2 j + h of chunk
    kt), element (token block mb, token r, k) goes to [mb, kt, j, r, t, h, e]: lane (g, t) of
    an MMA reads planes 2j and 2j + 1 of token g as 16 contiguous bytes, and the 8 tokens of a
    tile as 512 contiguous bytes. One copy kernel (two with padding).
    """
    m, k = x2.shape
    mp, kp = triton_cdiv(m, tb) * tb, triton_cdiv(k, 128) * 128
    if mp != m or kp != k:
        x2 = torch.nn.functional.pad(x2, (0, kp - k, 0, mp - m))
    return (x2.view(mp // tb, tb, kp // 128, 4, 2, 4, 4)
            .permute(0, 2, 3, 1, 5, 4, 6).contiguous())


@functools.lru_cache(maxsize=None)
def _mma_asm(bf16: bool, zero: bool, group: int, n_tiles: int, even_k: bool, rows: int,
             xperm: bool = False, swapped: bool = False, partner: bool = False) -> str:
    from .ptx import mma_asm

    return mma_asm(bf16, zero, 128 // group if group < 128 else 1, n_tiles, even_k, rows,
                   xperm, swapped, partner)


@functools.lru_cache(maxsize=None)
def _mma_fs_asm(bf16: bool, zero: bool, n_tiles: int, even_k: bool, rows: int,
                xperm: bool = False, fold: bool = False, swapped: bool = False,
                partner: bool = False) -> str:
    from .ptx import mma_fs_asm

    return mma_fs_asm(bf16, zero, n_tiles, even_k, rows, xperm, fold, swapped, partner)


def _scale_vector(cfg: dict, p: PackedInt4, split_k: int, use_asm: bool) -> int:
    """``SV`` = 2 or 4: the MMA path loads SV chunks' scales (and zterms) per row with one 4- or
    8-byte load. Needs block 128 (one group per chunk), K a multiple of 128, SV dividing both
    the K slice of each program and the groups per row, and aligned scale rows; else 1."""
    sv = int(cfg.get("SV", 1) or 1)
    if sv not in (2, 4) or not use_asm or p.group_size != 128:
        return 1
    n, k = p.shape
    kt_total = triton_cdiv(k, 128)
    kt_per = triton_cdiv(kt_total, split_k)
    tensors = (p.scale,) if p.zterm is None else (p.scale, p.zterm)
    if (k % 128 or kt_per % sv or kt_total % sv
            or any(t.data_ptr() % (2 * sv) or t.stride(0) != kt_total for t in tensors)):
        return 1
    return sv


def _pipe(cfg: dict):
    """``PIPE`` = S > 1: the word loads of the GEMV / MMA K loop go through the software
    pipeliner (``cp.async`` into S - 1 shared-memory buffers, loaded S - 1 chunks ahead);
    None leaves the loop as plain loads."""
    s = int(cfg.get("PIPE", 0) or 0)
    return s if s > 1 else None


def _maxnreg(cfg: dict) -> dict:
    """Launch option capping registers per thread (``MAXNREG``; compiled code only)."""
    return {} if _interpreting() or not cfg.get("MAXNREG") else {"maxnreg": int(cfg["MAXNREG"])}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
