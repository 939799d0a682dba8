"""Small-M path (2..16 tokens per program): ``w4a16_mma_kernel`` dequantizes every packed
word once into ``mma.sync`` m16n8k16 register fragments (inline PTX built as text by
:func:`~.ptx.mma_asm` / :func:`~.ptx.mma_fs_asm`) and multiplies it with all the tokens, no
shared memory and no barrier; ``xperm_prep_kernel`` lays the activations out for its 16-byte
fragment loads (``XPERM``).
"""
import triton
import triton.language as tl

from .dequant import (_chunk_scale_zero, _dequant_byte, _half, _k_slice, _row_words,
                      _swap_pairs, _words_first, _words_next)
from .pdl import gdc_wait


@triton.jit
def xperm_prep_kernel(x_ptr, xp_ptr, out_ptr, M, K, stride_xm, n_out, zero_per_prog,
                      TB: tl.constexpr, BLOCK: tl.constexpr):
    """One launch before the MMA path's split-K kernel: x [M, K] re-laid out as
    :func:`~.ops.permute_x` (token block ``TB``, zero padding) and, with ``n_out`` > 0, the
    split-K output zeroed (``zero_per_prog`` elements per program, a multiple of BLOCK).

    Program (mb, kt) writes the 128 TB contiguous halves of token block mb and chunk kt:
    element d = ((j TB + r) 4 + t) 8 + 4 h + e comes from token mb TB + r, column
    128 kt + 32 j + 16 h + 4 t + e.
    """
    mb = tl.program_id(0)
    kt = tl.program_id(1)
    pid = mb * tl.num_programs(1) + kt
    d = tl.arange(0, 128 * TB)
    e = d % 4
    h = (d // 4) % 2
    t = (d // 8) % 4
    r = (d // 32) % TB
    j = d // (32 * TB)
    row = mb * TB + r
    col = kt * 128 + 32 * j + 16 * h + 4 * t + e
    v = tl.load(x_ptr + row * stride_xm + col, mask=(row < M) & (col < K), other=0.0)
    tl.store(xp_ptr + pid * (128 * TB) + d, v)
    if n_out > 0:
        z = tl.zeros([BLOCK], out_ptr.dtype.element_ty)
        for start in range(pid * zero_per_prog, (pid + 1) * zero_per_prog, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, z, mask=offs < n_out)


@triton.jit
def _load_half_raw(ptrs, USE_ASM: tl.constexpr):
    """A half-precision load in the consumer's layout (see :func:`_load_half`)."""
    if USE_ASM:
        v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int16, is_pure=True, pack=1)
        return v.to(ptrs.dtype.element_ty, bitcast=True)
    return tl.load(ptrs)


@triton.jit
def _mma_scales(s_rows, z_rows, g, n_groups, shape: tl.constexpr, HAS_ZERO: tl.constexpr,
                EVEN_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Scale and zterm of group g for the rows, broadcast to the [BN, 16] tile."""
    if not EVEN_K:
        g = tl.minimum(g, n_groups - 1)
    s = tl.broadcast_to(_load_half_raw(s_rows + g, USE_ASM), shape)
    if HAS_ZERO:
        z = tl.broadcast_to(_load_half_raw(z_rows + g, USE_ASM), shape)
    else:
        z = s
    return s, z


@triton.jit
def _load_halves(ptrs, SV: tl.constexpr):
    """SV (2 or 4) consecutive half-precision values from each pointer of ``ptrs`` ([BN, 1]) in
    one 4- or 8-byte inline load (consumer's layout), as SV tensors of the pointee dtype."""
    dt: tl.constexpr = ptrs.dtype.element_ty
    if SV == 2:
        v = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        a = _half(v, dt)
        b = _half(v >> 16, dt)
        return a, b, a, b
    v, w = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                     [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32),
                                     is_pure=True, pack=1)
    return _half(v, dt), _half(v >> 16, dt), _half(w, dt), _half(w >> 16, dt)


@triton.jit
def _load_pairs(ptrs, SV: tl.constexpr, dt: tl.constexpr):
    """SV (2 or 4) consecutive scale / zterm words (:func:`~.packing.pair_scales`) from each
    pointer of ``ptrs`` ([BN, 1]) in one 8- or 16-byte inline load: SV scales, then SV zterms
    (padded to 4 each), as tensors of dtype ``dt``."""
    if SV == 2:
        a, b = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l",
                                         [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)
        c, d = a, b
    else:
        a, b, c, d = tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
            [ptrs.to(tl.int64)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    return (_half(a, dt), _half(b, dt), _half(c, dt), _half(d, dt),
            _half(a >> 16, dt), _half(b >> 16, dt), _half(c >> 16, dt), _half(d >> 16, dt))


@triton.jit
def _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total, m_left, stride_xm, K,
                    shape: tl.constexpr, XTB: tl.constexpr):
    """The asm's activation operands for chunk kt, broadcast to ``shape``: the chunk's x
    address (its permuted block when XTB > 0), M - 1, the x row stride in bytes, the K left."""
    if XTB > 0:
        xa = tl.zeros(shape, tl.int64) + (
            x_ptr + (pid_m * kt_total + kt) * (128 * XTB)).to(tl.int64)
    else:
        xa = tl.zeros(shape, tl.int64) + (x_rows + kt * 128).to(tl.int64)
    mm1 = tl.zeros(shape, tl.int32) + (m_left - 1)
    stride_b = tl.zeros(shape, tl.int32) + stride_xm * 2
    krem = tl.zeros(shape, tl.int32) + (K - kt * 128)
    return xa, mm1, stride_b, krem


@triton.jit
def _mma_asm_chunk(acc, q, s16, z16, kt, x_ptr, x_rows, pid_m, kt_total, m_left, stride_xm, K,
                   BN: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                   ROWS: tl.constexpr, FS: tl.constexpr, XTB: tl.constexpr,
                   HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    """One chunk of the MMA path's asm (one group per chunk): s16 / z16 are the rows' scale
    and zterm ([BN, 1], activation dtype; z16 unused without zero points)."""
    shape: tl.constexpr = (BN, 16)
    xa, mm1, stride_b, krem = _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total, m_left,
                                              stride_xm, K, shape, XTB)
    if FS > 0:
        s32 = s16.to(tl.float32)
        if HAS_ZERO:
            z32 = z16.to(tl.float32)
        else:
            z32 = -8.0 * s32
        if FS == 2:
            if IS_BF16:
                ce32 = z32 - 128.0 * s32
                co32 = ce32
            else:
                ce32 = z32 - 1024.0 * s32
                co32 = z32 - 64.0 * s32
        else:
            ce32 = z32 + 8.0 * s32
            co32 = ce32
        return tl.inline_asm_elementwise(
            ASM, CONSTRAINTS,
            [q, tl.broadcast_to(s32, shape), tl.broadcast_to(ce32, shape),
             tl.broadcast_to(co32, shape), acc, xa, mm1, stride_b, krem],
            dtype=tl.float32, is_pure=True, pack=4 * ROWS)
    sa = tl.broadcast_to(s16, shape)
    if HAS_ZERO:
        za = tl.broadcast_to(z16, shape)
    else:
        za = sa
    return tl.inline_asm_elementwise(
        ASM, CONSTRAINTS, [q, sa, sa, sa, sa, za, za, za, za, acc, xa, mm1, stride_b, krem],
        dtype=tl.float32, is_pure=True, pack=4 * ROWS)


@triton.jit
def _mma_token(c):
    """Token of accumulator column c (see :func:`~.ptx.mma_asm`):
    2 (c // 4) + c % 2 + 8 (c // 2 % 2)."""
    return 2 * (c // 4) + (c % 2) + 8 * ((c // 2) % 2)


@triton.jit
def w4a16_mma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr = False,
    IS_BF16: tl.constexpr = False, PREFETCH: tl.constexpr = False, ASM: tl.constexpr = "",
    CONSTRAINTS: tl.constexpr = "", DOT_F32: tl.constexpr = False, ROWS: tl.constexpr = 2,
    XTB: tl.constexpr = 0, PIPE: tl.constexpr = None, FS: tl.constexpr = 0,
    QC: tl.constexpr = "", QE: tl.constexpr = "", SV: tl.constexpr = 1,
    PAIRS: tl.constexpr = False, PDL: tl.constexpr = False, TR: tl.constexpr = 0,
):
    """Small-M path (M = 2..16 tokens per program): every packed word is dequantized once and
    multiplied with all the tokens on the tensor cores (``mma.sync`` m16n8k16 in inline asm,
    :func:`~.ptx.mma_asm`), with the dequantized weights and the activations going straight from
    global memory into the MMA's register fragments: no shared memory, no barrier.

    Grid (token blocks of 16, SPLIT_K, row blocks of BN = 8 ROWS num_warps: ROWS = 2 or 4 rows
    per thread, all in one asm call, which share the activation loads). The accumulator is a
    [BN, 16] float32 tile in the word tile's layout; column c holds token
    :func:`_mma_token` (c). Without USE_ASM (the interpreter) the same product runs as eight
    ``tl.dot`` per chunk on the same dequantized planes.

    XTB > 0: x is the per-call permuted copy of :func:`permute_x` with token blocks of XTB
    (8 or 16) zero-padded tokens, 128 XTB halves per chunk and block.

    Load options (NOTES.md, v8-v10): PIPE = S puts the word loads through the software
    pipeliner (cp.async, S - 1 chunks ahead); QC / QE are the word loads' cache modifier and
    eviction policy (the H100 table uses evict_first: the words pass through L1 once); SV = 2 or
    4 takes SV chunks per step and loads each row's SV scales and zterms with one 4- or 8-byte
    load (block 128 only, checked by the launcher); FS = 1 / 2 applies the scales in float32
    after the MMAs (:func:`~.ptx.mma_fs_asm`, block >= 128). PAIRS (with SV > 1 and zero points):
    s_ptr holds :func:`~.packing.pair_scales`, and one 8- or 16-byte load per row brings the SV
    chunks' scales and zterms together. TR: the words' row blocks (``packing.tile_words``; 0
    row by row).
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    m0 = pid_m * 16
    m_left = tl.minimum(M - m0, 16)
    kt_total, kt0, kt1 = _k_slice(K, pid_k, SPLIT_K)
    rn, rn_safe, q_ptrs, qs = _row_words(q_ptr, pid_n, N, kt_total, BN, TR)
    rj = tl.arange(0, 16)
    s_rows = s_ptr + rn_safe[:, None] * n_groups
    z_rows = z_ptr + rn_safe[:, None] * n_groups
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    tok = _mma_token(rj)                                     # token of accumulator column
    x_rows = x_ptr + m0 * stride_xm
    shape: tl.constexpr = (BN, 16)

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    if SV > 1:  # SV chunks per step: their words, then one SV-wide load of scales and zterms
        # (block 128, SV | K slice, SV | groups per row: the launcher checks)
        for kt2 in range(kt0, kt1, SV):
            qa = tl.load(q_ptrs + kt2 * qs, cache_modifier=QC, eviction_policy=QE)
            qb = tl.load(q_ptrs + (kt2 + 1) * qs, cache_modifier=QC, eviction_policy=QE)
            if SV == 4:
                qc = tl.load(q_ptrs + (kt2 + 2) * qs, cache_modifier=QC, eviction_policy=QE)
                qd = tl.load(q_ptrs + (kt2 + 3) * qs, cache_modifier=QC, eviction_policy=QE)
            if PAIRS:
                s0, s1, s2, s3, z0, z1, z2, z3 = _load_pairs(s_rows + kt2, SV,
                                                             x_ptr.dtype.element_ty)
            else:
                s0, s1, s2, s3 = _load_halves(s_rows + kt2, SV)
                if HAS_ZERO:
                    z0, z1, z2, z3 = _load_halves(z_rows + kt2, SV)
                else:
                    z0, z1, z2, z3 = s0, s1, s2, s3
            acc = _mma_asm_chunk(acc, qa, s0, z0, kt2, x_ptr, x_rows, pid_m, kt_total, m_left,
                                 stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB, HAS_ZERO,
                                 IS_BF16)
            acc = _mma_asm_chunk(acc, qb, s1, z1, kt2 + 1, x_ptr, x_rows, pid_m, kt_total,
                                 m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                 HAS_ZERO, IS_BF16)
            if SV == 4:
                acc = _mma_asm_chunk(acc, qc, s2, z2, kt2 + 2, x_ptr, x_rows, pid_m, kt_total,
                                     m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                     HAS_ZERO, IS_BF16)
                acc = _mma_asm_chunk(acc, qd, s3, z3, kt2 + 3, x_ptr, x_rows, pid_m, kt_total,
                                     m_left, stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB,
                                     HAS_ZERO, IS_BF16)
        kt1 = kt0   # done: the general loop below runs no iteration
    if not PAIRS:  # (PAIRS comes with SV > 1: the loop above did every chunk)
        q_next = _words_first(q_ptrs, qs, kt0, kt1, PREFETCH, QC, QE)
        for kt in tl.range(kt0, kt1, num_stages=PIPE):
            q, q_next = _words_next(q_ptrs, qs, q_next, kt, kt1, PREFETCH, QC, QE)
            g0 = kt * GPC if GROUP < 128 else (kt * 128) // GROUP
            if USE_ASM and FS > 0:  # one group per chunk; scales applied in float32 (mma_fs_asm)
                gs = g0
                if not EVEN_K:
                    gs = tl.minimum(gs, n_groups - 1)
                s16 = _load_half_raw(s_rows + gs, USE_ASM)
                z16 = s16
                if HAS_ZERO:
                    z16 = _load_half_raw(z_rows + gs, USE_ASM)
                acc = _mma_asm_chunk(acc, q, s16, z16, kt, x_ptr, x_rows, pid_m, kt_total, m_left,
                                     stride_xm, K, BN, ASM, CONSTRAINTS, ROWS, FS, XTB, HAS_ZERO,
                                     IS_BF16)
            elif USE_ASM:
                sa, za = _mma_scales(s_rows, z_rows, g0, n_groups, shape, HAS_ZERO, EVEN_K, USE_ASM)
                sb, zb = sa, za
                sc, zc = sa, za
                sd, zd = sa, za
                if GPC >= 2:
                    sb, zb = _mma_scales(s_rows, z_rows, g0 + 1, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                if GPC == 4:
                    sc, zc = _mma_scales(s_rows, z_rows, g0 + 2, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                    sd, zd = _mma_scales(s_rows, z_rows, g0 + 3, n_groups, shape, HAS_ZERO, EVEN_K,
                                         USE_ASM)
                xa, mm1, stride_b, krem = _mma_x_operands(x_ptr, x_rows, pid_m, kt, kt_total,
                                                          m_left, stride_xm, K, shape, XTB)
                acc = tl.inline_asm_elementwise(
                    ASM, CONSTRAINTS,
                    [q, sa, sb, sc, sd, za, zb, zc, zd, acc, xa, mm1, stride_b, krem],
                    dtype=tl.float32, is_pure=True, pack=4 * ROWS)
            else:
                if TR > 0:   # the plain planes read whole words: the tiled pairs back once
                    q = _swap_pairs(q)
                if XTB > 0:  # k 16 i + 4 t + e of load j = i // 2 at [j, token, t, i % 2, e]
                    tmask = (tok < XTB)[None, :]
                    x_ptrs = (x_ptr + (pid_m * kt_total + kt) * (128 * XTB) + tok[None, :] * 32
                              + (rj // 4)[:, None] * 8 + (rj % 4)[:, None])
                else:
                    x_ptrs = x_rows + tok[None, :] * stride_xm + rj[:, None]  # [16 k, 16 tokens]
                    tmask = (tok < m_left)[None, :]
                for b in tl.static_range(4):
                    if (b * 32) % (128 // GPC) == 0:
                        s, z = _chunk_scale_zero(s_ptr + rn_safe * n_groups,
                                                 z_ptr + rn_safe * n_groups, kt, b, n_groups, GPC,
                                                 GROUP, EVEN_K, HAS_ZERO)
                    lo, hi = _dequant_byte(q, s, z, b, False, HAS_ZERO, IS_BF16)
                    for h in tl.static_range(2):
                        kk = kt * 128 + 32 * b + 16 * h
                        if XTB > 0:
                            xt = tl.load(x_ptrs + (b * 32 * XTB + 4 * h), mask=tmask, other=0.0)
                        else:
                            xt = tl.load(x_ptrs + kk, mask=tmask & ((kk + rj) < K)[:, None],
                                         other=0.0)
                        w = lo if h == 0 else hi
                        if DOT_F32:
                            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
                        else:
                            acc = tl.dot(w, xt, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_safe).to(tl.float32)[:, None] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + (m0 + tok)[None, :] * stride_om + rn[:, None]
    omask = (rn[:, None] < N) & (tok < m_left)[None, :]
    if ATOMIC:
        if PDL:   # launched right after the output's zeroing kernel (kernels.pdl)
            gdc_wait()
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
