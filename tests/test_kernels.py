import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

from modelopt_lite.kernels import (dequantize, pack_weight, w4a16_matmul,  # noqa: E402
                                   w4a16_reference)
from modelopt_lite.kernels.tuning import (default_config, fused_smem_bytes,  # noqa: E402
                                          pick_config)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _problem(m, n, k, group, zero, dtype, bias=True):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // group) * 0.02 + 0.002
    zp = torch.rand(n, k // group) * 15 if zero else None
    p = pack_weight(codes.to(DEVICE), scale.to(DEVICE), None if zp is None else zp.to(DEVICE),
                    group, dtype)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    return x, p, b


def _ref32(x, p, b):
    return w4a16_reference(x.float(), p._replace(scale=p.scale.float(),
                           zterm=None if p.zterm is None else p.zterm.float()),
                           None if b is None else b.float())


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
SMALL = dict(BM=16, BN=32, SPLIT_K=1, num_warps=4, num_stages=2)
SPLIT = dict(BM=16, BN=16, SPLIT_K=3, num_warps=4, num_stages=2)
FUSED = dict(BM=16, BN=32, SPLIT_K=2, num_warps=4, num_stages=2, FUSE_K=True)
GEMV = dict(GEMV=True, BN=16, SPLIT_K=1, num_warps=4, num_stages=2)
GEMV_SPLIT = dict(GEMV=True, BN=32, SPLIT_K=3, num_warps=4, num_stages=2, PREFETCH=True)
GEMV_OUT16 = dict(GEMV=True, BN=16, SPLIT_K=2, num_warps=4, num_stages=2, OUT16=True)
GEMV_PF2 = dict(GEMV=True, BN=16, SPLIT_K=3, num_warps=4, num_stages=2, PREFETCH=2,
                K_FAST=False)
DEQUANT = dict(DEQUANT=True, DQ_BN=16, DQ_CHUNKS=2)
# the H100 table's M <= 256 tile: the token tile shrinks to the tokens' power of two (>= 16)
BIG_TILE = dict(BM=256, BN=32, SPLIT_K=2, num_warps=8, num_stages=3, FUSE_K=True)
PAIRS = dict(BM=16, BN=32, SPLIT_K=2, num_warps=4, num_stages=2, FUSE_K=True, PAIRS=True)
# the pairs transposed, [K/B, N]
PAIRS_T = dict(BM=16, BN=32, SPLIT_K=2, num_warps=4, num_stages=2, FUSE_K=True, PAIRS=2)
EMPTY_SPLIT = dict(BM=16, BN=32, SPLIT_K=4, num_warps=4, num_stages=2, FUSE_K=True)
# split-K partials added straight into the fp16 output (fp16 atomics; bf16: float32 buffer)
FUSED_OUT16 = dict(FUSED, SPLIT_K=3, OUT16=True)
# persistent GEMV: PROGRAMS programs walk (row block, K slice) items, words loaded AHEAD steps
GEMV_PERSIST = dict(GEMV=True, BN=16, SPLIT_K=3, num_warps=4, PERSIST=1, PROGRAMS=4)
GEMV_PERSIST_A2 = dict(GEMV=True, BN=16, SPLIT_K=3, num_warps=4, PERSIST=1, PROGRAMS=4, AHEAD=2,
                       OUT16=True)
GEMV_PERSIST_STORE = dict(GEMV=True, BN=16, SPLIT_K=1, num_warps=4, PERSIST=1, PROGRAMS=2,
                          AHEAD=2)
GEMV_PERSIST_SM = dict(GEMV=True, BN=32, SPLIT_K=2, num_warps=2, PERSIST=8, PREFETCH=2)
# small-M tensor-core GEMV: BN = 16 * num_warps (2 rows per thread)
MMA = dict(MMA=True, BN=16, SPLIT_K=1, num_warps=1, num_stages=2)
MMA_SPLIT = dict(MMA=True, BN=32, SPLIT_K=3, num_warps=2, num_stages=2, PREFETCH=True)
MMA_OUT16 = dict(MMA=True, BN=16, SPLIT_K=2, num_warps=1, num_stages=2, OUT16=True)
MMA_ROWS4 = dict(MMA=True, BN=64, SPLIT_K=2, num_warps=2, num_stages=2)   # 4 rows per thread
# activations permuted once per call for 16-byte fragment loads
MMA_XPERM = dict(MMA=True, BN=32, SPLIT_K=3, num_warps=2, num_stages=2, XPERM=True)
MMA_XPERM_ROWS4 = dict(MMA=True, BN=64, SPLIT_K=1, num_warps=2, num_stages=2, XPERM=True,
                       OUT16=True)
# word loads through the software pipeliner (PIPE) or with L1 evict-first / L2-only hints, and
# the asm-only options (FS, SV: the interpreter runs the plain-Triton product with them set)
MMA_PIPE = dict(MMA=True, BN=32, SPLIT_K=3, num_warps=2, PIPE=3, QE="evict_first")
MMA_FS_SV = dict(MMA=True, BN=32, SPLIT_K=2, num_warps=2, FS=2, SV=2, QC=".cg", OUT16=True)
GEMV_PIPE = dict(GEMV=True, BN=16, SPLIT_K=3, num_warps=4, PIPE=4, QE="evict_first")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("m,n,k,group,cfg", [
    (1, 40, 256, 128, SMALL),    # decode, N not a multiple of BN
    (2, 16, 576, 32, SMALL),     # K not a multiple of the 128-wide chunk
    (3, 48, 384, 32, SPLIT),     # split-K with a short last split
    (17, 24, 320, 64, SMALL),    # two M tiles, K not a multiple of BK
    (5, 72, 128, 128, None),     # the shipped default config
    (7, 40, 320, 32, FUSED),     # planes joined into one 128-deep product per chunk
    (1, 40, 256, 128, GEMV),     # CUDA-core decode path, N not a multiple of BN
    (2, 24, 576, 32, GEMV_SPLIT),   # decode path: split-K, K not a multiple of 128
    (3, 48, 384, 64, GEMV_SPLIT),   # decode path: block 64, one token per program
    (2, 40, 320, 32, GEMV_OUT16),   # decode path: split-K added in the output dtype (fp16)
    (1, 40, 640, 128, GEMV_PF2),    # decode path: words and scales prefetched, short last split
    # persistent GEMV: 9 items over 4 programs (3 / 2 / 2 / 2), short last K slice, N tail
    (1, 40, 640, 128, GEMV_PERSIST),
    (1, 40, 640, 128, GEMV_PERSIST_A2),    # 2 steps ahead across items, fp16 atomics
    (1, 40, 576, 32, GEMV_PERSIST_A2),     # block 32, K not a multiple of 128
    (3, 24, 448, 64, GEMV_PERSIST),        # block 64, K tail, one token per grid row
    (1, 40, 384, 128, GEMV_PERSIST_STORE),  # no split: each item's rows stored once
    (2, 72, 320, 32, GEMV_PERSIST_STORE),
    (1, 72, 512, 128, GEMV_PERSIST_SM),    # programs = PERSIST x SMs, more than the items
    (2, 24, 576, 32, GEMV_PIPE),    # pipelined word loads, K not a multiple of 128
    (1, 40, 256, 32, BIG_TILE),     # a 256-token tile asked for one token
    (7, 40, 320, 32, PAIRS),        # scale and zero term as one word per row and block
    (5, 40, 640, 128, EMPTY_SPLIT),  # 5 chunks over 4 splits of 2: the last split is empty
    (19, 40, 448, 64, PAIRS),       # block 64, K not a multiple of 128, two token tiles
    (5, 72, 384, 128, PAIRS),
    (3, 40, 320, 64, dict(SMALL, PAIRS=True)),   # the per-16-k product path reads pairs too
    (7, 40, 320, 32, PAIRS_T),      # the pairs transposed: one group's words of a row tile
    (19, 40, 448, 64, PAIRS_T),     # contiguous; N not a multiple of BN, K tail
    (3, 40, 320, 64, dict(SMALL, PAIRS=2)),
    (33, 24, 384, 32, BIG_TILE),    # ... for 33 tokens (a 64-token tile), split-K
    (7, 72, 640, 128, FUSED_OUT16),   # fused split-K into the output dtype, short last split
    # a warp-specialized (WS, Gluon, Hopper) config where it cannot run: the fused kernel
    (33, 40, 384, 128, dict(BIG_TILE, SPLIT_K=1, WS=True, STAGES=3)),
    (33, 300, 256, 128, dict(BM=128, BN=256, SPLIT_K=1, num_warps=16, num_stages=3, FUSE_K=True,
                             PAIRS=2)),   # 16 warps (4 warpgroups), N not a multiple of BN
    (19, 40, 448, 64, dict(PAIRS_T, OUT16=True)),   # ... with transposed pairs, two token tiles
    (5, 40, 320, 64, DEQUANT),      # large-M path: dequantize, then torch matmul
    (4, 24, 384, 128, DEQUANT),
])
def test_kernel_matches_reference(dtype, zero, m, n, k, group, cfg):
    x, p, b = _problem(m, n, k, group, zero, dtype)
    y = w4a16_matmul(x, p, b, cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


@pytest.mark.parametrize("rows,m,k,group,cfg", [
    (256, 1, 256, 128, GEMV), (128, 2, 576, 32, GEMV_SPLIT), (256, 1, 640, 128, GEMV_PERSIST_A2),
    (128, 1, 640, 128, GEMV_PERSIST_A2), (128, 3, 384, 32, SPLIT), (256, 7, 320, 32, FUSED),
    (128, 19, 448, 64, PAIRS_T), (256, 5, 384, 128, PAIRS), (128, 5, 320, 64, DEQUANT),
    (256, 7, 448, 64, MMA_SPLIT), (128, 13, 384, 128, MMA_XPERM_ROWS4),
    (256, 13, 384, 128, MMA_FS_SV), (128, 7, 448, 32, MMA_PIPE),
    (256, 33, 384, 128, dict(BIG_TILE, SPLIT_K=1, WS=True, STAGES=3))])
def test_tiled_words_through_every_kernel_path(rows, m, k, group, cfg):
    """Words laid out tile by tile (``PackedInt4.tiled``, deploy's layout; N = 300: two or one
    whole row blocks and a partial last one) give the same outputs as row by row, bit for bit,
    on every Triton path."""
    x, p, b = _problem(m, 300, k, group, True, torch.float16)
    pt = p.tiled(rows)
    assert pt.tile_rows == rows and pt.shape == p.shape
    assert not torch.equal(pt.qweight, p.qweight)
    y = w4a16_matmul(x, pt, b, cfg)
    assert torch.equal(y, w4a16_matmul(x, p, b, cfg))
    assert _rel_err(y, _ref32(x, p, b)) < TOL[torch.float16]


def test_tiled_words_checks():
    x, p, b = _problem(2, 72, 256, 128, True, torch.float16)
    with pytest.raises(ValueError, match="multiple of 128"):
        w4a16_matmul(x, p._replace(tile_rows=100), b)
    pt = p.tiled(128)
    assert torch.equal(dequantize(pt), dequantize(p))
    assert pt.tiled(128) is pt and torch.equal(pt.tiled(256).qweight, p.tiled(256).qweight)
    assert torch.equal(p.tiled(256).row_words(), p.qweight) and p.row_words() is p.qweight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,n,cfg,k_tail", [
    (3, 40, MMA, False),         # odd M (one token tile of 8), N not a multiple of BN
    (7, 72, MMA_SPLIT, True),    # split-K with a short last split, K not a multiple of 128
    (13, 24, MMA_OUT16, False),  # two token tiles of 8, split-K added in the output dtype
    (16, 40, MMA, True),         # a full 16-token block
    (19, 24, MMA_SPLIT, False),  # two 16-token blocks, the second with 3 tokens
    (11, 72, MMA_ROWS4, True),   # 4 rows per thread, N and K tails
    (5, 40, MMA_XPERM, True),    # permuted activations: one token tile, padded K and tokens
    (13, 72, MMA_XPERM_ROWS4, False),   # permuted, two token tiles, 4 rows per thread
    (21, 24, MMA_XPERM, False),  # permuted, two 16-token blocks
    (13, 40, dict(MMA_XPERM, PREP=False), True),   # permuted and zeroed by torch ops
    (7, 72, MMA_PIPE, True),     # pipelined word loads, evict-first hint, K tail
    (13, 40, MMA_FS_SV, False),  # float32 scales and 2-chunk scale loads requested
])
def test_mma_path_matches_reference(dtype, zero, group, m, n, cfg, k_tail):
    k = 448 if k_tail and group < 128 else 384
    x, p, b = _problem(m, n, k, group, zero, dtype)
    y = w4a16_matmul(x, p, b, cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


def test_pair_scales_bits_and_cache():
    from modelopt_lite.kernels.ops import _pairs
    from modelopt_lite.kernels.packing import pair_scales

    for dtype in (torch.float16, torch.bfloat16):
        for zero in (True, False):
            _, p, _ = _problem(1, 24, 256, 64, zero, dtype)
            sz = pair_scales(p)
            assert sz.dtype == torch.int32 and sz.shape == p.scale.shape
            low = (sz & 0xFFFF).to(torch.int16).view(dtype)
            assert torch.equal(low, p.scale)
            high = (sz >> 16).to(torch.int16).view(dtype)
            assert torch.equal(high, p.zterm if zero else torch.zeros_like(p.scale))
    first = _pairs(p)
    assert _pairs(p) is first                      # built once per scale tensor
    assert torch.equal(_pairs(p, transposed=True), first.t())   # and layout
    assert _pairs(p) is first
    p.scale.mul_(2)                                # an in-place change rebuilds it
    again = _pairs(p)
    assert again is not first
    assert torch.equal((again & 0xFFFF).to(torch.int16).view(p.scale.dtype), p.scale)


def _int_zero_problem(n, k, dtype, symmetric=False, group=128):
    from modelopt_lite.kernels.packing import quantize_rtn

    codes, scale, zero = quantize_rtn(torch.randn(n, k, device=DEVICE), group,
                                      symmetric=symmetric, integer_zero=True)
    return pack_weight(codes, scale, zero, group, dtype), zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_integer_zeros_recovered_exactly(dtype):
    """Integer zero points come back from (scale, zterm) bit for bit, including where a
    block is constant (scale clamped tiny) or its zero is 0 / 15; fractional zero points and
    symmetric weights give None; and one fractional block anywhere makes the whole weight None."""
    from modelopt_lite.kernels.packing import integer_zeros, quantize_rtn

    w = torch.randn(48, 1152)
    w[3, :128] = 0.7                              # a constant block
    w[5, 128:256] = torch.linspace(0, 1, 128)     # zero point 0
    w[6, 128:256] = torch.linspace(-1, 0, 128)    # zero point 15
    codes, scale, zero = quantize_rtn(w, 128, integer_zero=True)
    assert zero[5, 1] == 0 and zero[6, 1] == 15
    p = pack_weight(codes, scale, zero, 128, dtype)
    z = integer_zeros(p)
    assert z is not None and z.dtype == torch.uint8 and torch.equal(z, zero.to(torch.uint8))
    assert torch.equal((-z.float() * p.scale.float()).to(dtype), p.zterm)
    codes, scale, zero = quantize_rtn(w, 128)     # fractional zeros
    assert integer_zeros(pack_weight(codes, scale, zero, 128, dtype)) is None
    zero = zero.round()
    zero[7, 2] += 0.5                             # one block off the integers
    assert integer_zeros(pack_weight(codes, scale, zero, 128, dtype)) is None
    codes, scale, _ = quantize_rtn(w, 128, symmetric=True)
    assert integer_zeros(pack_weight(codes, scale, None, 128, dtype)) is None


def test_zero_words_layout():
    """zero_words: block g of row n in nibble g % 8 of word [g // 8, n] (the high nibble
    too: words with bit 31 set), the last word's unused nibbles zero."""
    from modelopt_lite.kernels.packing import zero_words

    z = torch.randint(0, 16, (40, 19), dtype=torch.uint8)
    z[0] = 15
    words = zero_words(z)
    assert words.dtype == torch.int32 and words.shape == (3, 40) and words.is_contiguous()
    u = words.to(torch.int64) & 0xFFFFFFFF
    for g in range(24):
        got = (u[g // 8] >> (4 * (g % 8))) & 0xF
        assert torch.equal(got, z[:, g].long() if g < 19 else torch.zeros(40, dtype=torch.long))


def test_ws_scales_modes(monkeypatch):
    """ws_scales picks the warp-specialized kernel's scale layout: the bare scales for
    symmetric weights, scales and zero-point words for integer zero points, the scale / zero-term
    pairs otherwise (fractional zeros, N not a multiple of 8, or MODELOPT_LITE_WS_SCALES=pairs);
    built once per scale tensor, rebuilt after an in-place change."""
    from modelopt_lite.kernels import ops
    from modelopt_lite.kernels.packing import integer_zeros, zero_words

    p, _ = _int_zero_problem(64, 1152, torch.float16, symmetric=True)
    mode, s_t, z_t = ops.ws_scales(p)
    assert mode == 1 and z_t is None and torch.equal(s_t, p.scale.t())
    p, zero = _int_zero_problem(64, 1152, torch.float16)
    first = ops.ws_scales(p)
    assert first[0] == 2 and torch.equal(first[1], p.scale.t())
    assert torch.equal(first[2], zero_words(integer_zeros(p)))
    assert ops.ws_scales(p) is first
    p.zterm.add_(p.scale * 0.5)   # zero points now fractional: the pairs
    mode, s_t, z_t = ops.ws_scales(p)
    assert mode == 0 and z_t is None and torch.equal(s_t, ops._pairs(p, transposed=True))
    _, p, _ = _problem(1, 64, 1152, 128, True, torch.float16)
    assert ops.ws_scales(p)[0] == 0
    p, _ = _int_zero_problem(60, 1152, torch.float16)
    assert ops.ws_scales(p)[0] == 0    # N = 60: 16-bit rows of 120 bytes
    p, _ = _int_zero_problem(64, 1152, torch.float16)
    monkeypatch.setenv(ops.ENV_WS_SCALES, "pairs")
    assert ops.ws_scales(p)[0] == 0


@pytest.mark.parametrize("m, cfg, mode", [(1, {}, 2), (8, {}, 2), (9, {}, 0), (64, {}, 0),
                                          (64, dict(SCALES="compact"), 2),
                                          (1, dict(SCALES="pairs"), 0)])
def test_ws_dispatch_picks_scale_layout(monkeypatch, m, cfg, mode):
    """w4a16_matmul hands the warp-specialized kernel the compact scales (here integer zero
    points) at M <= 8, where the product streams its weights, and the pairs above, unless the
    config's SCALES says otherwise."""
    from modelopt_lite.kernels import ops, ws

    seen = {}
    monkeypatch.setattr(ops, "_interpreting", lambda: False)
    monkeypatch.setattr(ws, "ws_supported", lambda x2, p, cfg=None: True)
    monkeypatch.setattr(ws, "w4a16_ws", lambda x2, p, scales, bias, c: (
        seen.update(mode=scales[0]), x2.new_zeros(x2.shape[0], p.shape[0]))[1])
    p, _ = _int_zero_problem(64, 256, torch.float16)
    x = torch.randn(m, 256, device=DEVICE).half()
    assert w4a16_matmul(x, p, None, dict(WS=True, BN=128, BM=16, **cfg)).shape == (m, 64)
    assert seen["mode"] == mode


def test_permute_x_layout():
    from modelopt_lite.kernels.ops import permute_x

    m, k, tb = 11, 320, 16
    x = torch.randn(m, k)
    xp = permute_x(x, tb)
    assert xp.shape == (1, 3, 4, tb, 4, 2, 4)
    for r, kk in ((0, 0), (3, 17), (10, 255), (7, 300), (10, 319)):
        kt, j, h, t, e = kk // 128, kk % 128 // 32, kk % 32 // 16, kk % 16 // 4, kk % 4
        assert xp[0, kt, j, r, t, h, e] == x[r, kk]
    assert xp[0, 2, 3].abs().sum() == 0 and xp[0, :, :, m:].abs().sum() == 0   # zero padding


def test_mma_asm_xperm_loads_16_bytes():
    from modelopt_lite.kernels.ptx import mma_asm

    for n_tiles in (1, 2):
        text = mma_asm(False, True, 1, n_tiles, False, rows=4, xperm=True)
        assert text.count("ld.global.nc.v4.b32") == 4 * n_tiles
        assert "ld.global.nc.v2" not in text and "setp" not in text
        assert text.count("mma.sync") == 8 * 2 * n_tiles


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("fold", [False, True])
def test_mma_fs_asm_text(bf16, zero, fold):
    """FS: only the codes reach the MMAs (no packed FMA per weight pair), the sums of x come from
    one all-ones MMA per plane and token tile where needed, fp16 odd planes need no shift, and
    FS 2 drops the packed subtract too."""
    from modelopt_lite.kernels.ptx import mma_fs_asm

    for rows, n_tiles in ((2, 1), (4, 2)):
        text = mma_fs_asm(bf16, zero, n_tiles, True, rows=rows, fold=fold)
        sums = zero or fold
        assert text.count("mma.sync") == 8 * (rows // 2) * n_tiles + (8 * n_tiles if sums else 0)
        assert "fma.rn.f16x2" not in text and "fma.rn.bf16x2" not in text
        assert ("shr.u32 p" in text) == bf16          # plane shifts (bf16 only)
        assert ("sub.rn." in text) == (not fold)
        ffma_per = 1 + (1 if sums else 0) + (1 if fold and not bf16 else 0)
        assert text.count("fma.rn.f32") == 4 * (rows // 2) * n_tiles * ffma_per


def test_scale_vector_falls_back_where_it_cannot_apply():
    from modelopt_lite.kernels.ops import _scale_vector

    codes = torch.randint(0, 16, (40, 1024), dtype=torch.uint8)
    p = pack_weight(codes, torch.rand(40, 8) + 0.1, None, 128)
    assert _scale_vector(dict(SV=4), p, 2, True) == 4      # 8 chunks per K slice
    assert _scale_vector(dict(SV=4), p, 4, True) == 1      # 2 chunks per K slice
    assert _scale_vector(dict(SV=2), p, 4, True) == 2
    assert _scale_vector(dict(SV=4), p, 2, False) == 1     # no asm (interpreter)
    p64 = pack_weight(torch.randint(0, 16, (40, 1024), dtype=torch.uint8), torch.rand(40, 16) + 0.1,
                      None, 64)
    assert _scale_vector(dict(SV=2), p64, 2, True) == 1    # block 64: two groups per chunk


def test_mma_path_rejects_a_tile_it_cannot_map():
    x, p, _ = _problem(4, 32, 128, 32, True, torch.float16)
    with pytest.raises(ValueError, match="BN = 16 or 32"):
        w4a16_matmul(x, p, None, dict(MMA=True, BN=48, SPLIT_K=1, num_warps=2))


def test_kernel_leading_dims_and_no_bias():
    x, p, _ = _problem(6, 32, 128, 32, True, torch.float16, bias=False)
    y = w4a16_matmul(x.view(2, 3, 128), p, None, SMALL)
    assert y.shape == (2, 3, 32)
    assert _rel_err(y.view(6, 32), _ref32(x, p, None)) < TOL[torch.float16]


def test_dequantize_fp_matches_reference():
    from modelopt_lite.kernels.ops import dequantize_fp
    from modelopt_lite.kernels.packing import dequantize

    for zero in (True, False):
        _, p, _ = _problem(1, 24, 320, 64, zero, torch.float16)
        w = dequantize_fp(p, torch.float16, dict(DQ_BN=16, DQ_CHUNKS=2))
        ref = dequantize(p, torch.float32)
        assert w.dtype == torch.float16 and w.shape == (24, 320)
        assert (w.float() - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()


def test_kernel_rejects_mismatched_inputs():
    x, p, _ = _problem(2, 16, 128, 32, True, torch.float16)
    with pytest.raises(ValueError, match="input features"):
        w4a16_matmul(x[:, :64], p)
    with pytest.raises(TypeError, match="dtype"):
        w4a16_matmul(x.bfloat16(), p)


def test_default_config_fills_the_gpu_for_decode():
    cfg = default_config(1, 8192, 28672)
    assert cfg["GEMV"] and cfg["SPLIT_K"] > 1
    for m in (2, 4, 9, 16):   # the small-M tensor-core GEMV, K split to fill the GPU
        cfg = default_config(m, 8192, 28672)
        assert cfg["MMA"] and cfg["SPLIT_K"] > 1 and cfg["BN"] // cfg["num_warps"] in (16, 32)
    assert default_config(16, 4096, 4096)["SPLIT_K"] == 16
    assert default_config(2, 64, 256)["SPLIT_K"] == 1
    assert default_config(32, 4096, 4096)["FUSE_K"]
    assert default_config(256, 28672, 8192)["SPLIT_K"] == 1
    assert default_config(1024, 28672, 8192)["DEQUANT"]
    assert "PAIRS" not in default_config(300, 4096, 4096)
    # a GPU whose blocks get less shared memory: fewer pipeline stages
    mid = default_config(128, 28672, 8192, smem_bytes=100 * 1024)
    assert mid["num_stages"] == 2 and fused_smem_bytes(mid) <= 100 * 1024
    assert default_config(128, 28672, 8192, smem_bytes=227 * 1024)["num_stages"] == 4
    assert pick_config(2, 8192, 28672, 128, None)["MMA"]
    assert default_config(256, 28672, 8192)["PAIRS"]          # K >= 8192: one word per block
    split = default_config(64, 4096, 4096)                    # fused split-K: fp16 atomics
    assert split["SPLIT_K"] > 1 and split["OUT16"] and split.get("FUSE_K")
    assert "OUT16" not in default_config(256, 28672, 8192)   # no split (224 tiles)
    assert "PAIRS" not in default_config(256, 4096, 4096)


def test_ws_config_fallback_and_row_blocks(monkeypatch):
    """A WS config where the warp-specialized kernel cannot run becomes a fused config of the
    same tile; calls past the kernels' 32-bit offsets run in row blocks."""
    from modelopt_lite.kernels import ops

    fb = ops._ws_fallback(dict(WS=True, BN=256, BM=256, STAGES=3, PERSIST=1, SPLIT_K=4))
    assert fb["BM"] == 128 and fb["BN"] == 256 and fb["SPLIT_K"] == 1 and "PERSIST" not in fb
    assert fb["FUSE_K"] and fb["num_warps"] == 8          # the fused kernel's defaults filled in
    assert ops._ws_fallback(dict(WS=True, BM=64, BN=128, num_warps=4))["num_warps"] == 4
    # stream-K rows keep the split their fused config was tuned with; WS-only keys go
    fb = ops._ws_fallback(dict(WS=True, BM=128, SPLIT_K=2, STREAM=1, PERSIST=1, TILED=True))
    assert fb["SPLIT_K"] == 2 and not {"STREAM", "PERSIST", "TILED"} & set(fb)
    # a row tuned from a small-M (mma) config: the fused kernel, its own warps and stages
    fb = ops._ws_fallback(dict(MMA=True, BN=256, SPLIT_K=4, num_warps=4, XPERM=True, WS=True,
                               BM=64, STAGES=5, OUT16=True))
    assert "MMA" not in fb and fb["num_warps"] == 8 and fb["BN"] == 256 and fb["SPLIT_K"] == 4
    x, p, b = _problem(9, 72, 512, 128, True, torch.float16)
    assert _rel_err(w4a16_matmul(x, p, b, fb), _ref32(x, p, b)) < TOL[torch.float16]
    x, p, b = _problem(100, 40, 384, 128, True, torch.float16)
    want = w4a16_matmul(x, p, b, SMALL)
    monkeypatch.setattr(ops, "_MAX_ELEMENTS", 40 * 384)    # 40 rows per block: 3 blocks
    calls = []
    real = ops.w4a16_matmul
    monkeypatch.setattr(ops, "w4a16_matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    got = real(x, p, b, SMALL)
    assert calls == [40, 40, 20] and torch.equal(got, want)


def test_ws_default_for_large_m_on_hopper():
    from modelopt_lite.kernels.tuning import ws_default

    cfg = ws_default(1024, 11008, 4096, 128, (9, 0))           # a shape outside the tables
    assert cfg["WS"] and cfg["BM"] == 256 and cfg["SPLIT_K"] == 1 and cfg["PERSIST"] == 1
    assert cfg["FUSE_K"] and cfg["BN"] == 128                  # the fallback is a fused tile
    assert ws_default(512, 11008, 4096, 128, (9, 0))           # 86 x 2 tiles
    assert ws_default(512, 4096, 4096, 128, (9, 0)) is None    # 64 tiles: dequantize + cuBLAS
    assert ws_default(1024, 11008, 4096, 128, (8, 0)) is None  # no wgmma
    assert ws_default(1024, 11008, 4096, 128, (10, 0)) is None
    assert ws_default(1024, 11008, 4096, 64, (9, 0)) is None   # block 64
    assert ws_default(1024, 11006, 4096, 128, (9, 0)) is None  # N not a multiple of 4
    assert pick_config(1024, 11008, 4096, 128, None)["DEQUANT"]   # no GPU: unchanged


def test_ws_default_below_512_tokens_by_m_range_and_layer_size():
    """M < 512 on Hopper, shapes without a table row: a stream-K tile per M range on layers of
    at least 24 M weights (M <= 64) or 16 M (M 65-511); the shape heuristic below that."""
    from modelopt_lite.kernels.tuning import ws_default

    def tile(m, n, k):
        cfg = ws_default(m, n, k, 128, (9, 0))
        return cfg and (cfg["BM"], cfg["BN"], cfg.get("WGS", 2), cfg["STREAM"])

    for m, want in ((1, (16, 128, 2, 2)), (16, (16, 128, 2, 2)), (17, (64, 256, 4, 1)),
                    (64, (64, 256, 4, 1)), (65, (256, 128, 2, 1)), (256, (256, 128, 2, 1)),
                    (257, (128, 256, 2, 1)), (511, (128, 256, 2, 1))):
        assert tile(m, 18944, 3584) == want, m
    cfg = ws_default(1, 18944, 3584, 128, (9, 0))
    assert cfg["WS"] and cfg["SPLIT_K"] == 1 and cfg["FUSE_K"] and cfg["MAXNREG"] == 80
    assert "PERSIST" not in cfg
    assert ws_default(64, 8192, 2048, 128, (9, 0)) is None     # 16.8 M weights: the heuristic
    assert tile(65, 8192, 2048) == (256, 128, 2, 1)           # ... but not from M = 65
    assert ws_default(128, 4096, 2048, 128, (9, 0)) is None    # 8.4 M weights
    assert ws_default(64, 5120, 5120, 128, (9, 0))             # 26 M weights
    assert ws_default(64, 18944, 3584, 128, (8, 9)) is None    # no wgmma
    assert ws_default(64, 18944, 3584, 64, (9, 0)) is None     # block 64
    assert ws_default(64, 18946, 3584, 128, (9, 0)) is None    # N not a multiple of 4
    assert ws_default(64, 18944, 3600, 128, (9, 0)) is None    # K not a multiple of 128


def test_gemv_mma_default_for_1_to_4_tokens_on_hopper():
    """M <= 4 on Hopper, shapes without a table row, layers of >= 16 M weights: the 4-warp MMA
    GEMV, its K split in slices of a multiple of SV blocks nearest 14 programs per SM."""
    from modelopt_lite.kernels.tuning import gemv_mma_default

    def pick(m, n, k, **kw):
        cfg = gemv_mma_default(m, n, k, 128, kw.pop("cap", (9, 0)), **kw)
        return cfg and (cfg["SV"], cfg["SPLIT_K"])

    assert pick(1, 18944, 3584) == (4, 7)      # 28 blocks: 296 tiles x 7 = 2072 programs
    assert pick(4, 3584, 18944) == (4, 37)     # 148 blocks = 37 x 4
    assert pick(1, 28672, 8192) == (4, 4)      # the H100 table's row (v50)
    assert pick(1, 8192, 28672) == (4, 14)
    assert pick(2, 4096, 11008) == (2, 43)     # 86 blocks: 2 blocks' scales per load
    assert pick(1, 28672, 8192, num_sms=66) == (4, 2)    # half the SMs, half the split
    cfg = gemv_mma_default(3, 14336, 4096, 128, (9, 0))
    assert cfg["MMA"] and cfg["BN"] == 64 and cfg["num_warps"] == 4 and cfg["OUT16"]
    assert pick(5, 18944, 3584) is None                  # measured up to 4 tokens
    assert pick(1, 18944, 3584, cap=(8, 0)) is None      # Hopper only
    assert gemv_mma_default(1, 18944, 3584, 64, (9, 0)) is None   # block 64
    assert pick(1, 2048, 4096) is None                   # 8.4 M weights
    assert pick(1, 4096, 5504) is None                   # 43 blocks per row: odd
    assert pick(1, 4096, 4160) is None                   # K not a multiple of 128
    assert pick(2, 4096, 4096) == (4, 8)       # 16 M weights: the smallest layer it takes
    assert pick_config(1, 18944, 3584, 128, None).get("GEMV")   # no GPU: the heuristic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
def test_gemv_mma_default_config_runs(dtype, zero):
    """The rule's config for 86 blocks a row (split 43 ways, 2 blocks a slice) against the
    float32 reference, with N ending in a partial tile and 3 tokens, in the interpreter on CPU
    (where SV falls back to 1: the compiled SV 2 load runs in the GPU tests)."""
    from modelopt_lite.kernels.tuning import gemv_mma_default

    cfg = gemv_mma_default(3, 4096, 11008, 128, (9, 0))
    assert cfg is not None and (cfg["SV"], cfg["SPLIT_K"]) == (2, 43)
    x, p, b = _problem(3, 72, 11008, 128, zero, dtype)
    assert _rel_err(w4a16_matmul(x, p.tiled(), b, cfg), _ref32(x, p, b)) < TOL[dtype]


def test_pick_config_on_hopper_without_a_row(monkeypatch):
    """pick_config on a (pretended) H200: a table row wins; a shape without one takes the
    1-4 token GEMV rule, then the WS tile from 5 tokens; a DEFAULT row takes the same chain;
    on an sm_80 GPU (no table) the shape heuristic."""
    from modelopt_lite.kernels import tuning

    cap = [(9, 0)]
    monkeypatch.setattr(tuning, "_gpu_key", lambda device: "h200")
    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    monkeypatch.setattr(tuning, "_smem_bytes", lambda device: 227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    dev = torch.device("cuda")
    row = tuning._rows(tuning._table("h200"), 28672, 8192)[0]
    assert row["max_m"] == 1 and tuning.pick_config(1, 28672, 8192, 128, dev) == row["config"]
    cfg = tuning.pick_config(1, 18944, 3584, 128, dev)               # no row for this shape
    assert cfg["MMA"] and not cfg.get("WS") and (cfg["SV"], cfg["SPLIT_K"]) == (4, 7)
    assert tuning.pick_config(5, 18944, 3584, 128, dev)["WS"]         # ws_default from 5 tokens
    assert [r["config"] for r in tuning._rows(tuning._table("h200"), 4096, 4096)
            if r["max_m"] == 2] == [{"DEFAULT": True}]
    assert tuning.pick_config(2, 4096, 4096, 128, dev)["SPLIT_K"] == 8   # DEFAULT row: the rule
    monkeypatch.setattr(tuning, "_gpu_key", lambda device: "default")
    cap[0] = (8, 0)
    assert tuning.pick_config(1, 18944, 3584, 128, dev) == tuning.default_config(
        1, 18944, 3584, 132, 227 * 1024)


def test_wperm_activations_match_the_kernels_word_view():
    """WPERM: the consumer reads its [rows, 16] word tile through reshape [rows, 4, 2, 2],
    permute (0, 2, 1, 3), reshape [rows, 16] (emulated here on word indices); the activations'
    16-wide K blocks must be permuted the same way, so that the product is unchanged."""
    from modelopt_lite.kernels.ws import wperm_activations

    view = torch.arange(16).reshape(4, 2, 2).permute(1, 0, 2).reshape(16)   # column -> word
    x = torch.randn(5, 256, dtype=torch.float64)
    w = torch.randn(7, 256, dtype=torch.float64)
    xp = wperm_activations(x)
    assert xp.is_contiguous() and torch.equal(xp.view(5, 16, 16), x.view(5, 16, 16)[:, :, view])
    # the kernel's A tile: plane column c of each 16-wide block holds word view[c]
    wp = w.view(7, 16, 16)[:, :, view].reshape(7, 256)
    torch.testing.assert_close(xp @ wp.t(), x @ w.t())
    assert view.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]


def test_ws_regs_only_where_the_tile_leaves_room():
    from modelopt_lite.kernels.ws import _regs

    assert _regs(dict(MAXNREG=80), 128, 16) == dict(REGS=80, maxnreg=80)
    assert _regs(dict(MAXNREG=80), 128, 64) == dict(REGS=80, maxnreg=80)
    assert _regs(dict(MAXNREG=80), 128, 128) == {}    # a 128-token accumulator needs more
    assert _regs(dict(MAXNREG=80), 256, 64) == {}     # 128 rows per warpgroup: it would spill
    assert _regs({}, 128, 16) == {}
    for bad in (24, 200):
        with pytest.raises(ValueError, match="MAXNREG"):
            _regs(dict(MAXNREG=bad), 128, 16)


def test_ws_consumer_warpgroups():
    """WGS 4: four 64-row consumer warpgroups at 120 registers, only over 256-row tiles of
    at most 64 tokens; anything else is refused with what to change."""
    from modelopt_lite.kernels.ws import _consumers

    assert _consumers(dict(WGS=4), 256, 64) == dict(NC=4, REGS=120)
    assert _consumers(dict(WGS=4, MAXNREG=80), 256, 16) == dict(NC=4, REGS=120)
    assert _consumers(dict(MAXNREG=80), 128, 16) == dict(REGS=80, maxnreg=80)
    assert _consumers(dict(WGS=2), 256, 64) == {}
    for cfg, rows, bm in ((dict(WGS=4), 128, 64), (dict(WGS=4), 256, 128), (dict(WGS=3), 256, 64)):
        with pytest.raises(ValueError, match="WGS"):
            _consumers(cfg, rows, bm)


def test_ws_launch_grid():
    """The WS launch: a program per tile and K slice; PERSIST / STREAM programs per SM, capped
    by tiles / chunks; stream-K past int32 run bounds falls back to the persistent walk."""
    from modelopt_lite.kernels.ws import _launch

    assert _launch(dict(SPLIT_K=4), 224, 64, 132) == ((224, 4), 4, False, False)
    assert _launch(dict(SPLIT_K=99), 10, 3, 132) == ((10, 3), 3, False, False)
    assert _launch(dict(PERSIST=1, SPLIT_K=4), 896, 64, 132) == ((132, 1), 1, True, False)
    assert _launch(dict(PERSIST=1), 20, 64, 132) == ((20, 1), 1, True, False)
    assert _launch(dict(STREAM=1, PERSIST=1, SPLIT_K=2), 224, 64, 132) == (
        (132, 1), 1, False, True)
    assert _launch(dict(STREAM=2, PROGRAMS=5), 2, 2, 132) == ((4, 1), 1, False, True)
    big = 2**31 // 64 // 100           # tiles x 64 chunks x 133 programs past int32
    assert _launch(dict(STREAM=1), big, 64, 132) == ((132, 1), 1, True, False)


@pytest.mark.parametrize("cfg, grid, const", [
    (dict(BM=256, STAGES=3), (8 * 2, 1), dict(ATOMIC=False, PERSIST=False, STREAM=False,
                                               COAL=False, TILED=False)),
    (dict(BM=256, STAGES=3, SPLIT_K=2, OUT16=True), (16, 2),
     dict(ATOMIC=True, COAL=True, STREAM=False, PDL=False)),       # COAL beside the 256 ring
    (dict(BM=256, STAGES=3, SPLIT_K=2), (16, 2), dict(ATOMIC=True, COAL=False)),  # float32 buffer
    (dict(BM=256, STAGES=3, PERSIST=1), (7, 1), dict(ATOMIC=False, PERSIST=True)),
    (dict(BM=256, STAGES=3, STREAM=1, OUT16=True), (7, 1),
     dict(ATOMIC=True, STREAM=True, PERSIST=False, COAL=True)),
    (dict(BM=16, STAGES=4, TILED=True, MAXNREG=80), (8 * 20, 1), dict(TILED=True, REGS=80)),
])
def test_ws_host_launch(monkeypatch, cfg, grid, const):
    """ws.w4a16_ws's launch without a GPU: the kernel replaced by a recorder, 7 SMs; grid,
    compile-time options and the output buffer (zeroed fp16 / float32 for atomics)."""
    from modelopt_lite.kernels import ops, tuning, ws

    if not ws.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    seen = {}

    class Kernel:
        def __getitem__(self, g):
            def launch(*args, **kw):
                seen.update(grid=g, args=args, kw=kw)
            return launch

    monkeypatch.setattr(ws, "w4a16_ws_kernel", Kernel())
    monkeypatch.setattr(ws, "_num_sms", lambda device: 7)
    monkeypatch.setattr(tuning, "_TILED_COPIES", True)
    m = 300 if cfg["BM"] == 256 else 16 * 20 - 3
    x, p, _ = _problem(m, 1000, 1024, 128, True, torch.float16, False)
    y = ws.w4a16_ws(x.cpu(), p, ops.ws_scales(p), None, dict(cfg, BN=128))
    assert seen["grid"] == grid
    assert {k: seen["kw"][k] for k in const} == const
    out = seen["args"][4]
    assert out.dtype == (torch.float32 if const.get("ATOMIC") and not cfg.get("OUT16")
                         else torch.float16)
    assert y.dtype == torch.float16 and y.shape == (m, 1000)
    if const.get("TILED"):   # the descriptor views the tile-by-tile copy
        assert seen["args"][1].base.shape == (8 * 8 * 128, 16)


@pytest.mark.parametrize("split", [1, 3])
def test_ws_host_launch_pdl(monkeypatch, split):
    """Where kernels.pdl zeroes the split-K output for a dependent launch, the kernel is
    launched with launch_pdl and waits (PDL) before its atomics; without a split, neither."""
    from modelopt_lite.kernels import ops, ws

    if not ws.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    seen, zeroed = {}, []

    class Kernel:
        def __getitem__(self, g):
            def launch(*args, **kw):
                seen.update(args=args, kw=kw)
            return launch

    def zero_(out):
        zeroed.append(out)
        out.zero_()
        return True

    monkeypatch.setattr(ws, "w4a16_ws_kernel", Kernel())
    monkeypatch.setattr(ws, "zero_", zero_)
    x, p, _ = _problem(5, 1000, 1024, 128, True, torch.float16, False)
    ws.w4a16_ws(x.cpu(), p, ops.ws_scales(p), None,
                dict(BN=128, BM=16, STAGES=4, SPLIT_K=split, OUT16=True))
    assert seen["kw"]["PDL"] == (split > 1) and seen["kw"].get("launch_pdl", False) == (split > 1)
    assert [t is seen["args"][4] for t in zeroed] == ([True] if split > 1 else [])


def test_pdl_zero_off_hopper(monkeypatch):
    """kernels.pdl.zero_ zeroes in place everywhere, and asks for a PDL launch only on a
    CUDA GPU of capability 9.0+ with MODELOPT_LITE_PDL not 0."""
    from modelopt_lite.kernels import pdl

    t = torch.ones(3, 5)
    assert pdl.zero_(t) is False and not t.any()
    assert pdl.zero_(torch.ones(0, 5)) is False
    assert not pdl.pdl_ok(torch.device("cpu"))
    monkeypatch.setenv(pdl.ENV_PDL, "0")
    assert not pdl.pdl_ok(torch.device("cuda", 0))


def test_tiled_copies_opt_in(monkeypatch):
    """TILED configs keep a second copy of the words: only after allow_tiled_copies() or with
    MODELOPT_LITE_TILED=1."""
    from modelopt_lite.kernels import allow_tiled_copies, tuning

    monkeypatch.setattr(tuning, "_TILED_COPIES", None)
    monkeypatch.delenv(tuning.ENV_TILED, raising=False)
    assert not tuning.tiled_copies_allowed()
    monkeypatch.setenv(tuning.ENV_TILED, "1")
    assert tuning.tiled_copies_allowed()
    allow_tiled_copies(False)            # the call wins over the environment
    assert not tuning.tiled_copies_allowed()
    allow_tiled_copies()
    assert tuning.tiled_copies_allowed()


def test_ws_tiled_words_layout():
    """tiled_words: word (n, j) of chunk c = j // 16 at row (n // R * K/128 + c) * R + n % R,
    column j % 16, the pairs' bytes swapped (packing.swap_pair_bytes); the last row block
    zero-padded; cached per weight and R; rebuilt after an in-place change."""
    from modelopt_lite.kernels.packing import swap_pair_bytes
    from modelopt_lite.kernels.ws import tiled_words

    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2**31, 2**31 - 1, (300, 64), dtype=torch.int32, generator=g)
    for r in (128, 256):
        t = tiled_words(q, r)
        nb = -(-300 // r)
        assert t.shape == (nb * 4 * r, 16) and t.is_contiguous()
        n = torch.arange(300).repeat_interleave(64)
        j = torch.arange(64).repeat(300)
        rows = (n // r * 4 + j // 16) * r + n % r
        assert torch.equal(t[rows, j % 16], swap_pair_bytes(q).flatten())
        assert int((t != 0).sum()) <= 300 * 64 and tiled_words(q, r) is t
    q[0, 0] += 1
    assert tiled_words(q, 128, build=False) is None          # stale: not handed out
    assert tiled_words(q, 128)[0, 0] == swap_pair_bytes(q)[0, 0]
    assert tiled_words(q, 256, build=False) is None          # dropped with the stale entry
    # K = 128 and whole row blocks: the layout is the words' own, still a copy (a view of
    # the key would keep the weight alive through the weak cache)
    import gc
    import weakref

    q2 = torch.zeros(256, 16, dtype=torch.int32)
    t2 = tiled_words(q2, 128)
    assert torch.equal(t2, swap_pair_bytes(q2)) and t2.data_ptr() != q2.data_ptr()
    ref = weakref.ref(q2)
    del q2, t2
    gc.collect()
    assert ref() is None


def test_ws_coalesced_epilogue_where_shared_memory_allows():
    """COAL's layout conversion beside the ring: 16-bit outputs up to the 256-token, 3-stage
    ring (compiled: 226,880 of 232,448 bytes on sm_90a), float32 split buffers with room for a
    whole tile only (the 256-token ring would need 255,552)."""
    from modelopt_lite.kernels.ws import _coal_fits

    assert _coal_fits(128, 256, 3, 2, 2)          # fp16 / bf16 output
    assert not _coal_fits(128, 256, 3, 2, 4)      # bf16 split: a float32 buffer
    assert _coal_fits(128, 64, 6, 2, 4)
    assert _coal_fits(256, 64, 6, 2, 2) and not _coal_fits(256, 64, 7, 2, 2)
    assert not _coal_fits(128, 256, 4, 2, 2)      # the ring alone is too big


def test_pick_config_table_rows_and_default_rows(monkeypatch):
    from modelopt_lite.kernels import tuning

    fused = dict(BM=64, BN=128, SPLIT_K=2, num_warps=8, FUSE_K=True)
    table = {"512x256": [dict(max_m=8, config={"DEFAULT": True}),
                         dict(max_m=64, config=fused),
                         dict(max_m=1 << 30, config={"DEFAULT": True})]}
    monkeypatch.setattr(tuning, "_table", lambda key: table)
    assert pick_config(40, 512, 256, 128, None) == fused
    assert pick_config(3, 512, 256, 128, None) == default_config(3, 512, 256)
    assert pick_config(1000, 512, 256, 128, None) == default_config(1000, 512, 256)
    assert pick_config(3, 1024, 256, 128, None) == default_config(3, 1024, 256)  # no such key


def test_user_config_table_from_the_environment(monkeypatch, tmp_path):
    import json

    from modelopt_lite.kernels import tuning

    mine = dict(BM=16, BN=32, SPLIT_K=3, num_warps=4, num_stages=2, FUSE_K=True)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"72x384": [dict(max_m=8, config=mine),
                                           dict(max_m=1 << 30, config={"DEFAULT": True})]}))
    monkeypatch.setenv(tuning.ENV_TABLE, str(path))
    assert pick_config(5, 72, 384, 128, None) == mine
    assert pick_config(9, 72, 384, 128, None) == default_config(9, 72, 384)
    assert pick_config(5, 40, 384, 128, None) == default_config(5, 40, 384)   # other shape
    x, p, b = _problem(5, 72, 384, 128, True, torch.float16)   # the kernel runs it
    assert _rel_err(w4a16_matmul(x, p, b), _ref32(x, p, b)) < TOL[torch.float16]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"72x384": [dict(max_m=64, config=mine),
                                          dict(max_m=8, config=mine)]}))
    monkeypatch.setenv(tuning.ENV_TABLE, str(bad))
    with pytest.raises(ValueError, match="ascending max_m"):
        pick_config(5, 72, 384, 128, None)
    monkeypatch.setenv(tuning.ENV_TABLE, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pick_config(5, 72, 384, 128, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 130, 513])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("cfg", [None, dict(GEMV=True, BN=64, SPLIT_K=4),
                                 dict(GEMV=True, BN=64, SPLIT_K=3, PREFETCH=True),
                                 dict(GEMV=True, BN=128, SPLIT_K=2, num_warps=8, OUT16=True),
                                 dict(GEMV=True, BN=64, SPLIT_K=3, PREFETCH=2),
                                 dict(GEMV=True, BN=32, SPLIT_K=3, num_warps=2, PERSIST=1),
                                 dict(GEMV=True, BN=64, SPLIT_K=2, PERSIST=1, PROGRAMS=7,
                                      AHEAD=2, OUT16=True),
                                 dict(GEMV=True, BN=128, SPLIT_K=1, PERSIST=1, PROGRAMS=3,
                                      AHEAD=2),
                                 dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4),
                                 dict(MMA=True, BN=32, SPLIT_K=3, num_warps=2, PREFETCH=True,
                                      OUT16=True),
                                 dict(MMA=True, BN=128, SPLIT_K=1, num_warps=8),
                                 dict(DEQUANT=True),
                                 dict(BM=256, BN=128, SPLIT_K=1, num_warps=8, num_stages=3,
                                      FUSE_K=True),
                                 dict(BM=64, BN=128, SPLIT_K=4, num_warps=8, num_stages=3,
                                      FUSE_K=True),
                                 dict(BM=256, BN=128, SPLIT_K=3, num_warps=8, num_stages=3,
                                      FUSE_K=True),
                                 dict(BM=256, BN=128, SPLIT_K=3, num_warps=8, num_stages=3,
                                      FUSE_K=True, PAIRS=True),
                                 dict(BM=64, BN=128, SPLIT_K=4, num_warps=8, num_stages=4,
                                      FUSE_K=True, PAIRS=True),
                                 dict(BM=64, BN=256, SPLIT_K=2, num_warps=8, num_stages=4,
                                      FUSE_K=True, PAIRS=2),
                                 # 16 warps: 4 warpgroups of 64 rows
                                 dict(BM=128, BN=256, SPLIT_K=1, num_warps=16, num_stages=3,
                                      FUSE_K=True, PAIRS=2),
                                 dict(BM=64, BN=256, SPLIT_K=2, num_warps=16, num_stages=4,
                                      FUSE_K=True, PAIRS=2, OUT16=True),
                                 # split-K added into the fp16 output (fp16 atomics)
                                 dict(BM=64, BN=128, SPLIT_K=4, num_warps=8, num_stages=4,
                                      FUSE_K=True, PAIRS=2, OUT16=True),
                                 dict(BM=256, BN=128, SPLIT_K=4, num_warps=8, num_stages=3,
                                      FUSE_K=True, PAIRS=True, OUT16=True),
                                 # 16 chunks over 5 splits of 4: the last split is empty
                                 dict(BM=256, BN=128, SPLIT_K=5, num_warps=8, num_stages=3,
                                      FUSE_K=True, PAIRS=True)])
def test_gpu_kernel_large_shapes(dtype, zero, m, group, cfg):
    if cfg and cfg.get("GEMV") and m > 16:
        pytest.skip("the GEMV path is for decode batches")
    x, p, b = _problem(m, 1000, 2048, group, zero, dtype)
    y = w4a16_matmul(x, p, b, cfg)
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


WS_TILE = dict(BN=128, SPLIT_K=1, num_warps=8, num_stages=3, FUSE_K=True, PAIRS=True, WS=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1, 7, 64, 130, 513])
@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=256, STAGES=3), dict(WS_TILE, BM=128, STAGES=4),
                                 dict(WS_TILE, BM=64, STAGES=4, GROUP_N=4),
                                 # K split 3 (16 chunks: 6 / 6 / 4) into the fp16 output (bf16:
                                 # a float32 buffer); 5 ways: 4 / 4 / 4 / 4 / 0, an empty slice
                                 dict(WS_TILE, BM=128, STAGES=4, SPLIT_K=3, OUT16=True),
                                 dict(WS_TILE, BM=256, STAGES=3, SPLIT_K=5),
                                 # persistent: 5 programs walk up to 72 tiles; 2 per SM
                                 dict(WS_TILE, BM=64, STAGES=4, PERSIST=1, PROGRAMS=5),
                                 dict(WS_TILE, BM=256, STAGES=3, PERSIST=2),
                                 # 256 rows per program, 128 per warpgroup
                                 dict(WS_TILE, BN=256, BM=128, STAGES=4),
                                 # the coalesced epilogue (COAL; on by default with a split)
                                 dict(WS_TILE, BM=64, STAGES=6, COAL=True),
                                 dict(WS_TILE, BM=64, STAGES=4, PERSIST=1, PROGRAMS=5, COAL=True),
                                 dict(WS_TILE, BM=16, STAGES=10, SPLIT_K=4, OUT16=True),
                                 dict(WS_TILE, BM=256, STAGES=3, COAL=True),
                                 dict(WS_TILE, BM=256, STAGES=3, SPLIT_K=2, OUT16=True),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, COAL=True),
                                 # stream-K: equal runs of chunks across tile boundaries
                                 dict(WS_TILE, BM=256, STAGES=3, STREAM=1, OUT16=True),
                                 dict(WS_TILE, BM=64, STAGES=4, STREAM=1, PROGRAMS=7),
                                 dict(WS_TILE, BM=16, STAGES=4, STREAM=2, OUT16=True,
                                      MAXNREG=80),
                                 # the words tile by tile (N = 1000: a padded last block)
                                 dict(WS_TILE, BM=16, STAGES=4, TILED=True, MAXNREG=80),
                                 dict(WS_TILE, BM=128, STAGES=4, SPLIT_K=3, TILED=True),
                                 dict(WS_TILE, BN=256, BM=128, STAGES=3, STREAM=1, TILED=True),
                                 # 80 registers per thread: two programs per SM
                                 dict(WS_TILE, BM=64, STAGES=4, SPLIT_K=2, OUT16=True, MAXNREG=80),
                                 dict(WS_TILE, BM=16, STAGES=6, MAXNREG=80),
                                 # four consumer warpgroups of 64 rows (WGS 4)
                                 dict(WS_TILE, BN=256, BM=64, STAGES=5, SPLIT_K=4, OUT16=True,
                                      WGS=4),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, WGS=4, TILED=True),
                                 dict(WS_TILE, BN=256, BM=16, STAGES=4, STREAM=1, WGS=4),
                                 # tiled words' byte gather by move / shift (GATHER)
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, WGS=4, TILED=True,
                                      GATHER="shift"),
                                 dict(WS_TILE, BM=128, STAGES=4, SPLIT_K=3, TILED=True,
                                      GATHER="shift"),
                                 # 16-byte word loads, the activations permuted to match
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, WGS=4, WPERM=True),
                                 dict(WS_TILE, BM=256, STAGES=3, STREAM=1, OUT16=True,
                                      WPERM=True)])
def test_gpu_ws_kernel(dtype, zero, bias, m, n, cfg, monkeypatch):
    """The warp-specialized kernel (kernels/ws.py) on Hopper: N and M tails (rows and tokens
    past the tile are zero-filled by the copies and masked at the store), bias, bf16, split-K."""
    from modelopt_lite.kernels import tuning
    from modelopt_lite.kernels.ws import ws_supported

    monkeypatch.setattr(tuning, "_TILED_COPIES", True)   # TILED configs: the tiled copy

    x, p, b = _problem(m, n, 2048, 128, zero, dtype, bias)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    y = w4a16_matmul(x, p, b, cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [388, 1000, 4096])
@pytest.mark.parametrize("m", [1, 37, 300])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=256, STAGES=3),
                                 dict(WS_TILE, BM=16, STAGES=4, SPLIT_K=3, OUT16=True,
                                      MAXNREG=80),
                                 dict(WS_TILE, BM=16, STAGES=4, STREAM=2, OUT16=True,
                                      MAXNREG=80, TILED=True),
                                 dict(WS_TILE, BN=256, BM=128, STAGES=4, STREAM=1),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, PERSIST=1),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=5, SPLIT_K=4, OUT16=True,
                                      WGS=4),
                                 dict(MMA=True, BN=128, SPLIT_K=4, num_warps=4, PAIRS=True,
                                      SV=4, QE="evict_first", OUT16=True, MAXNREG=80),
                                 # 4 rows a thread, both words of a pair named in each PRMT
                                 dict(MMA=True, BN=64, SPLIT_K=8, num_warps=2, SV=4,
                                      QE="evict_first", OUT16=True, PARTNER=True),
                                 dict(MMA=True, BN=64, SPLIT_K=2, num_warps=2, SV=2,
                                      XPERM=True, FS=2, PARTNER=True),
                                 # tuning.gemv_mma_default's kind (SV 2: 2 blocks a slice)
                                 dict(MMA=True, BN=64, SPLIT_K=8, num_warps=4, SV=2,
                                      QE="evict_first", OUT16=True, PREFETCH=False),
                                 dict(GEMV=True, BN=64, SPLIT_K=2, PERSIST=1, AHEAD=2)])
def test_gpu_tiled_words_read_in_place(dtype, n, m, cfg):
    """Deploy's tiled words (row blocks of 256; N = 388 and 1000 end in a partial block) read
    in place by the warp-specialized kernel's tensor copies, 128- and 256-row tiles, and by the
    Triton paths: the row-by-row words' output (bit for bit without atomics), and the float32
    reference."""
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(m, n, 2048, 128, True, dtype)
    if cfg.get("WS") and not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    if cfg.get("GEMV") and m > 16:
        pytest.skip("the GEMV path is for decode batches")
    pt = p.tiled()
    y = w4a16_matmul(x, pt, b, cfg)
    y0 = w4a16_matmul(x, p, b, cfg)
    if cfg.get("SPLIT_K", 1) > 1 or cfg.get("STREAM"):   # atomics: the order of the additions
        assert _rel_err(y, y0) < TOL[dtype]
    else:
        assert torch.equal(y, y0)
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=64, STAGES=4),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=5, WGS=4)])
def test_gpu_ws_odd_planes_in_place_equal_the_shift(zero, cfg):
    """fp16: the odd nibble planes read in place (one FMA by 1/16) give the same bits as the
    shift, mask and subtract they replaced (ODD_SHIFT), and match the float32 reference."""
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(37, 1000, 1152, 128, zero, torch.float16, True)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    y = w4a16_matmul(x, p, b, cfg)
    assert torch.equal(y, w4a16_matmul(x, p, b, dict(cfg, ODD_SHIFT=True)))
    assert _rel_err(y, _ref32(x, p, b)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 37, 300])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=256, STAGES=3),
                                 dict(WS_TILE, BM=64, STAGES=4, SPLIT_K=3, OUT16=True),
                                 dict(WS_TILE, BM=16, STAGES=4, STREAM=2, OUT16=True,
                                      MAXNREG=80, TILED=True),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=6, PERSIST=1, TILED=True),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=5, SPLIT_K=3, OUT16=True,
                                      WGS=4)])
def test_gpu_ws_compact_scales(dtype, symmetric, m, cfg, monkeypatch):
    """The warp-specialized kernel on its compact scale layouts (ops.ws_scales): symmetric
    scales alone and integer zero points as 4-bit words, over K = 1152 (9 blocks: a partial
    last zero-point word; split and stream-K runs that start mid-word), against the float32
    reference, and equal to the scale / zero-term pairs' output (the same weights in the same
    order: with integer zero points (u - z) * s rounded once is within an ulp of u * s +
    zterm; the splits' atomics within rounding)."""
    from modelopt_lite.kernels import ops, tuning
    from modelopt_lite.kernels.ws import ws_supported

    monkeypatch.setattr(tuning, "_TILED_COPIES", True)
    p, _ = _int_zero_problem(1000, 1152, dtype, symmetric)
    x = torch.randn(m, 1152, device=DEVICE).to(dtype)
    b = torch.randn(1000, device=DEVICE).to(dtype)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    assert ops.ws_scales(p)[0] == (1 if symmetric else 2)
    cfg = dict(cfg, SCALES="compact")   # by default at M <= 8 only
    y = w4a16_matmul(x, p, b, cfg)
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]
    monkeypatch.setenv(ops.ENV_WS_SCALES, "pairs")
    y0 = w4a16_matmul(x, p, b, cfg)
    atomic = cfg.get("SPLIT_K", 1) > 1 or cfg.get("STREAM")
    assert torch.equal(y, y0) if symmetric and not atomic else _rel_err(y, y0) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=16, STAGES=4, SPLIT_K=4, OUT16=True,
                                      MAXNREG=80, TILED=True),
                                 dict(WS_TILE, BM=16, STAGES=4, STREAM=2, OUT16=True,
                                      MAXNREG=80),
                                 dict(WS_TILE, BM=128, STAGES=4, SPLIT_K=3),
                                 # 12 slices of 3 of the 32 chunks: the last one empty
                                 dict(WS_TILE, BM=16, STAGES=4, SPLIT_K=12, OUT16=True),
                                 dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, SV=4,
                                      QE="evict_first", OUT16=True),
                                 # permuted activations from their own kernel, then the zeroing
                                 dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, XPERM=True,
                                      PREP=False, OUT16=True)])
def test_gpu_pdl_split_outputs(dtype, cfg, monkeypatch):
    """Split-K outputs zeroed by kernels.pdl with the GEMM launched as the zeroing kernel's
    programmatic dependent: the sums of a torch.zeros output (MODELOPT_LITE_PDL=0), eagerly
    and in a CUDA graph replayed on fresh activations (zero again at every replay, and the
    activations written just before each replay are the ones read)."""
    from modelopt_lite.kernels import pdl, tuning

    monkeypatch.setattr(tuning, "_TILED_COPIES", True)
    x, p, b = _problem(5, 4096, 4096, 128, True, dtype)
    if not pdl.pdl_ok(x.device):
        pytest.skip("programmatic dependent launch needs sm_90+")
    ref = _ref32(x, p, b)
    assert _rel_err(w4a16_matmul(x, p, b, cfg), ref) < TOL[dtype]
    monkeypatch.setenv(pdl.ENV_PDL, "0")   # atomics add in any order: both against the reference
    assert _rel_err(w4a16_matmul(x, p, b, cfg), ref) < TOL[dtype]
    monkeypatch.delenv(pdl.ENV_PDL)
    xs = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w4a16_matmul(xs, p, b, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xs.mul_(1.0)   # a kernel writing the activations right before the zeroing
        out = w4a16_matmul(xs, p, b, cfg)
    for _ in range(3):
        xs.copy_(torch.randn_like(xs))
        want = _ref32(xs, p, b)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, want) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("cfg", [None, dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, OUT16=True),
                                 dict(WS_TILE, BM=16, STAGES=4, SPLIT_K=4, OUT16=True)])
def test_gpu_second_device(cfg):
    """A layer on cuda:1 while cuda:0 is current (device_map="auto") runs on cuda:1."""
    x, p, b = _problem(5, 1000, 1024, 128, True, torch.float16)
    x, b = x.to("cuda:1"), b.to("cuda:1")
    p = p._replace(**{f: getattr(p, f).to("cuda:1") for f in ("qweight", "scale", "zterm")})
    with torch.cuda.device(0):
        y = w4a16_matmul(x, p, b, cfg)
    assert y.device == x.device
    assert _rel_err(y, _ref32(x, p, b)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [128, 256, 640])
@pytest.mark.parametrize("cfg", [dict(WS_TILE, BM=256, STAGES=3),   # fewer chunks than stages
                                 dict(WS_TILE, BN=256, BM=128, STAGES=4, PERSIST=1, PROGRAMS=3),
                                 dict(WS_TILE, BN=256, BM=64, STAGES=4, SPLIT_K=2, OUT16=True),
                                 dict(WS_TILE, BM=128, STAGES=4, STREAM=1, PROGRAMS=5,
                                      OUT16=True)])
def test_gpu_ws_short_k_and_combinations(k, cfg):
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(300, 1000, k, 128, True, torch.float16)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    assert _rel_err(w4a16_matmul(x, p, b, cfg), _ref32(x, p, b)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 13, 40, 100, 300])
def test_gpu_ws_default_below_512_tokens(dtype, m):
    """A layer without a table row (5124 x 5120, 26 M weights; N not a multiple of any tile)
    at each of ws_default's M ranges: the config it picks runs and matches the reference."""
    from modelopt_lite.kernels.tuning import ws_default
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(m, 5124, 5120, 128, True, dtype)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    cfg = pick_config(m, 5124, 5120, 128, x.device)
    assert cfg == ws_default(m, 5124, 5120, 128, (9, 0)) and cfg["WS"]
    assert _rel_err(w4a16_matmul(x, p, b), _ref32(x, p, b)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ws_ring_too_deep_is_refused_with_the_fix():
    """A WS config whose ring does not fit in shared memory (256-token tile, 6 stages): a
    ValueError that names the config and what to lower, not Triton's bare OutOfResources."""
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(256, 512, 1024, 128, True, torch.float16)
    if not ws_supported(x, p):
        pytest.skip("the warp-specialized kernel needs an sm_90 GPU and Gluon")
    with pytest.raises(ValueError, match="lower STAGES"):
        w4a16_matmul(x, p, b, dict(WS_TILE, BM=256, STAGES=6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group,n,row", [(32, 1000, 2048), (64, 1000, 2048), (128, 1002, 2048),
                                         (128, 1000, 2052)])
def test_gpu_ws_config_falls_back(group, n, row):
    """A WS config the warp-specialized kernel cannot take (block 32 / 64, N not a multiple of
    4, an activation row stride that is not a multiple of 16 bytes) runs the fused kernel with
    the same tile."""
    from modelopt_lite.kernels.ws import ws_supported

    x, p, b = _problem(37, n, 2048, group, True, torch.float16)
    x = torch.nn.functional.pad(x, (0, row - 2048))[:, :2048]   # row stride `row` elements
    assert not ws_supported(x, p)
    y = w4a16_matmul(x, p, b, dict(WS_TILE, BM=256, STAGES=3))
    assert _rel_err(y, _ref32(x, p, b)) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [3, 16, 37])
@pytest.mark.parametrize("cfg", [dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4),
                                 dict(MMA=True, BN=32, SPLIT_K=3, num_warps=2, PREFETCH=True,
                                      OUT16=True),
                                 dict(MMA=True, BN=16, SPLIT_K=1, num_warps=1),
                                 dict(MMA=True, BN=128, SPLIT_K=2, num_warps=4),
                                 dict(MMA=True, BN=128, SPLIT_K=4, num_warps=4, XPERM=True),
                                 dict(MMA=True, BN=64, SPLIT_K=3, num_warps=4, XPERM=True,
                                      PREFETCH=True, OUT16=True),
                                 # scales of 4 / 2 chunks per load, evict-first words, float32
                                 # scales (block 128; other blocks fall back)
                                 dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, SV=4,
                                      QE="evict_first", OUT16=True),
                                 dict(MMA=True, BN=64, SPLIT_K=2, num_warps=2, SV=2, XPERM=True,
                                      FS=2),
                                 dict(MMA=True, BN=128, SPLIT_K=4, num_warps=8, FS=1, PIPE=3),
                                 # scales and zterms of 4 / 2 chunks in one 16- / 8-byte load
                                 dict(MMA=True, BN=64, SPLIT_K=4, num_warps=4, SV=4,
                                      QE="evict_first", OUT16=True, PAIRS=True),
                                 dict(MMA=True, BN=128, SPLIT_K=8, num_warps=8, SV=2,
                                      XPERM=True, PAIRS=True)])
def test_gpu_mma_path(dtype, zero, group, m, cfg):
    k = 2048 + 64 if group < 128 else 2048   # K not a multiple of 128 where the block allows
    x, p, b = _problem(m, 1000, k, group, zero, dtype)
    y = w4a16_matmul(x, p, b, cfg)
    assert _rel_err(y, _ref32(x, p, b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,tb", [(11, 320, 16), (16, 256, 16), (3, 384, 8), (21, 200, 16)])
def test_xperm_prep_kernel_matches_permute_x(dtype, m, k, tb):
    """The one-launch prep (permute + zero fill) writes exactly permute_x's layout, padding
    included, and zeroes the whole split-K buffer."""
    from modelopt_lite.kernels.ops import _xperm_prep, permute_x

    x = torch.randn(m, k + 24, device=DEVICE).to(dtype)[:, :k]   # rows k + 24 apart
    out = torch.full((m, 37), 3.0, device=DEVICE)
    assert torch.equal(_xperm_prep(x, tb, out), permute_x(x, tb))
    assert not out.any()
    assert torch.equal(_xperm_prep(x, tb, None), permute_x(x, tb))


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_shipped_config_tables_are_well_formed_and_run(gpu):
    """Every row of a shipped per-GPU table: M ranges ascending and closed, and each distinct
    config computes the reference product (a small problem through the interpreter or GPU)."""
    from modelopt_lite.kernels import tuning

    table = tuning._table(gpu)
    assert table, f"kernels/configs/{gpu}.json is missing or empty"
    seen = []
    for key, rows in table.items():
        n, k = map(int, key.split("x"))
        max_ms = [r["max_m"] for r in rows]
        assert max_ms == sorted(max_ms) and max_ms[-1] >= 1 << 30, key
        for r in rows:
            cfg = r["config"]
            if not cfg.get("DEFAULT") and cfg not in seen:
                seen.append(cfg)
    torch.manual_seed(0)
    for cfg in seen:
        x, p, b = _problem(3, 72, 512, 128, True, torch.float16)
        y = w4a16_matmul(x, p, b, cfg)
        assert _rel_err(y, _ref32(x, p, b)) < TOL[torch.float16], cfg
