"""Decode path: the CUDA-core W4A16 GEMV, one token per program (``w4a16_gemv_kernel``).

No tensor-core tile to fill at one token: each thread dots its packed words with the chunk's
activations in packed half precision (inline asm, about two instructions per weight) and
applies scale and zero once per row, group and thread in float32. ``ops.py`` picks it by
config (the ``GEMV`` rows); since v6 the small-M MMA path (``mma.py``) serves M = 1 on the
H100 table's shapes.
"""
import triton
import triton.language as tl

from .dequant import _k_slice, _row_words, _swap_pairs, _word_ptrs, _words_first, _words_next
from .ptx import gemv_asm, xprep_asm


ASM_GEMV_F16_2 = tl.constexpr(gemv_asm(False, 2))
ASM_GEMV_F16_4 = tl.constexpr(gemv_asm(False, 4))
ASM_GEMV_BF16_2 = tl.constexpr(gemv_asm(True, 2))
ASM_GEMV_BF16_4 = tl.constexpr(gemv_asm(True, 4))
ASM_XPREP_F16_2 = tl.constexpr(xprep_asm(False, 2))
ASM_XPREP_F16_4 = tl.constexpr(xprep_asm(False, 4))
ASM_XPREP_BF16_2 = tl.constexpr(xprep_asm(True, 2))
ASM_XPREP_BF16_4 = tl.constexpr(xprep_asm(True, 4))


@triton.jit
def _centred(q, i: tl.constexpr):
    """Nibble plane i of q as u - 8, float32."""
    return (((q >> (4 * i)) & 0xF) - 8).to(tl.float32)


@triton.jit
def _gemv_word_sums(q, x0, x1, x2, x3, x4, x5, x6, x7, GS: tl.constexpr, USE_ASM: tl.constexpr,
                    IS_BF16: tl.constexpr):
    """Per word of q [BN, 16]: sum over its 8 planes of (u - 8) x, one float32 per group of
    the chunk (GS = 2: planes 0-3, 4-7; GS = 4: planes 0-1, 2-3, 4-5, 6-7), and the matching
    sums of x per column [1, 16]. x_i: [1, 16] activations of plane i."""
    if USE_ASM:
        xi = (x0.to(tl.int16, bitcast=True), x1.to(tl.int16, bitcast=True),
              x2.to(tl.int16, bitcast=True), x3.to(tl.int16, bitcast=True),
              x4.to(tl.int16, bitcast=True), x5.to(tl.int16, bitcast=True),
              x6.to(tl.int16, bitcast=True), x7.to(tl.int16, bitcast=True))
        if GS == 2:
            if IS_BF16:
                xasm: tl.constexpr = ASM_XPREP_BF16_2
                wasm: tl.constexpr = ASM_GEMV_BF16_2
            else:
                xasm: tl.constexpr = ASM_XPREP_F16_2
                wasm: tl.constexpr = ASM_GEMV_F16_2
            xp0, xp1, xp2, xp3, s0, s1 = tl.inline_asm_elementwise(
                xasm, "=r,=r,=r,=r,=r,=r,h,h,h,h,h,h,h,h", list(xi),
                dtype=(tl.int32,) * 6, is_pure=True, pack=1)
            shape: tl.constexpr = q.shape
            p0, p1 = tl.inline_asm_elementwise(
                wasm, "=r,=r,r,r,r,r,r",
                [q, tl.broadcast_to(xp0, shape), tl.broadcast_to(xp1, shape),
                 tl.broadcast_to(xp2, shape), tl.broadcast_to(xp3, shape)],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
            s0 = s0.to(tl.float32, bitcast=True)
            s1 = s1.to(tl.float32, bitcast=True)
            p2 = p0
            p3 = p0
            s2 = s0
            s3 = s0
        else:
            if IS_BF16:
                xasm: tl.constexpr = ASM_XPREP_BF16_4
                wasm: tl.constexpr = ASM_GEMV_BF16_4
            else:
                xasm: tl.constexpr = ASM_XPREP_F16_4
                wasm: tl.constexpr = ASM_GEMV_F16_4
            xp0, xp1, xp2, xp3, s0, s1, s2, s3 = tl.inline_asm_elementwise(
                xasm, "=r,=r,=r,=r,=r,=r,=r,=r,h,h,h,h,h,h,h,h", list(xi),
                dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            shape: tl.constexpr = q.shape
            p0, p1, p2, p3 = tl.inline_asm_elementwise(
                wasm, "=r,=r,=r,=r,r,r,r,r,r",
                [q, tl.broadcast_to(xp0, shape), tl.broadcast_to(xp1, shape),
                 tl.broadcast_to(xp2, shape), tl.broadcast_to(xp3, shape)],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            s0 = s0.to(tl.float32, bitcast=True)
            s1 = s1.to(tl.float32, bitcast=True)
            s2 = s2.to(tl.float32, bitcast=True)
            s3 = s3.to(tl.float32, bitcast=True)
    else:  # plain Triton, float32: the same sums
        f0 = x0.to(tl.float32)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        f3 = x3.to(tl.float32)
        f4 = x4.to(tl.float32)
        f5 = x5.to(tl.float32)
        f6 = x6.to(tl.float32)
        f7 = x7.to(tl.float32)
        t0 = _centred(q, 0) * f0 + _centred(q, 1) * f1
        t1 = _centred(q, 2) * f2 + _centred(q, 3) * f3
        t2 = _centred(q, 4) * f4 + _centred(q, 5) * f5
        t3 = _centred(q, 6) * f6 + _centred(q, 7) * f7
        if GS == 2:
            p0 = t0 + t1
            p1 = t2 + t3
            s0 = (f0 + f1) + (f2 + f3)
            s1 = (f4 + f5) + (f6 + f7)
            p2 = p0
            p3 = p0
            s2 = s0
            s3 = s0
        else:
            p0 = t0
            p1 = t1
            p2 = t2
            p3 = t3
            s0 = f0 + f1
            s1 = f2 + f3
            s2 = f4 + f5
            s3 = f6 + f7
    return p0, p1, p2, p3, s0, s1, s2, s3


@triton.jit
def _load_half(ptrs, USE_ASM: tl.constexpr):
    """A half-precision load as float32. With USE_ASM it is an elementwise inline load, so
    it takes the layout of its consumer: a plain [BN] load gets its own layout once BN reaches
    the thread count, and each conversion costs a shared-memory round trip and a barrier."""
    if USE_ASM:
        v = tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs.to(tl.int64)],
                                      dtype=tl.int16, is_pure=True, pack=1)
        return v.to(ptrs.dtype.element_ty, bitcast=True).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _gemv_scales(s_rows, z_rows, g, n_groups, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """(s, zterm + 8 s) of group g for the rows [BN, 1], float32: W = (u - 8) s + zterm + 8 s."""
    if not EVEN_K:  # the padded tail of the last chunk has no group of its own
        g = tl.minimum(g, n_groups - 1)
    s = _load_half(s_rows + g, USE_ASM)
    if HAS_ZERO:
        return s, _load_half(z_rows + g, USE_ASM) + 8.0 * s
    return s, s


@triton.jit
def _gemv_apply(acc, s, zc, p, xs, HAS_ZERO: tl.constexpr):
    """acc [BN, 16] += s * sum (u - 8) x + (zterm + 8 s) * sum x."""
    if HAS_ZERO:
        return acc + s * p + zc * xs
    return acc + s * p


@triton.jit
def _gemv_chunk(acc, q, sa, za, kt, x_ptrs, s_rows, z_rows, n_groups, K, GROUP: tl.constexpr,
                HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
                IS_BF16: tl.constexpr):
    """acc += one chunk (128 k) of the GEMV: words q [BN, 16], (sa, za) the scale of the
    chunk's first group; further groups (block 64 / 32) are loaded here."""
    GS: tl.constexpr = 4 if GROUP == 32 else 2
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    rj = tl.arange(0, 16)[None, :]
    g0 = kt * GPC if GROUP < 128 else (kt * 128) // GROUP
    sb, zb = sa, za
    sc, zc = sa, za
    sd, zd = sa, za
    if GPC >= 2:
        sb, zb = _gemv_scales(s_rows, z_rows, g0 + 1, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
    if GPC == 4:
        sc, zc = _gemv_scales(s_rows, z_rows, g0 + 2, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
        sd, zd = _gemv_scales(s_rows, z_rows, g0 + 3, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
    xb = x_ptrs + kt * 128
    if EVEN_K:
        x0 = tl.load(xb)
        x1 = tl.load(xb + 16)
        x2 = tl.load(xb + 32)
        x3 = tl.load(xb + 48)
        x4 = tl.load(xb + 64)
        x5 = tl.load(xb + 80)
        x6 = tl.load(xb + 96)
        x7 = tl.load(xb + 112)
    else:
        kk = kt * 128 + rj
        x0 = tl.load(xb, mask=kk < K, other=0.0)
        x1 = tl.load(xb + 16, mask=kk + 16 < K, other=0.0)
        x2 = tl.load(xb + 32, mask=kk + 32 < K, other=0.0)
        x3 = tl.load(xb + 48, mask=kk + 48 < K, other=0.0)
        x4 = tl.load(xb + 64, mask=kk + 64 < K, other=0.0)
        x5 = tl.load(xb + 80, mask=kk + 80 < K, other=0.0)
        x6 = tl.load(xb + 96, mask=kk + 96 < K, other=0.0)
        x7 = tl.load(xb + 112, mask=kk + 112 < K, other=0.0)
    p0, p1, p2, p3, s0, s1, s2, s3 = _gemv_word_sums(q, x0, x1, x2, x3, x4, x5, x6, x7,
                                                     GS, USE_ASM, IS_BF16)
    if GPC == 1:
        acc = _gemv_apply(acc, sa, za, p0 + p1, s0 + s1, HAS_ZERO)
    elif GPC == 2:
        acc = _gemv_apply(acc, sa, za, p0, s0, HAS_ZERO)
        acc = _gemv_apply(acc, sb, zb, p1, s1, HAS_ZERO)
    else:
        acc = _gemv_apply(acc, sa, za, p0, s0, HAS_ZERO)
        acc = _gemv_apply(acc, sb, zb, p1, s1, HAS_ZERO)
        acc = _gemv_apply(acc, sc, zc, p2, s2, HAS_ZERO)
        acc = _gemv_apply(acc, sd, zd, p3, s3, HAS_ZERO)
    return acc


@triton.jit
def _gemv_rows(q_ptr, s_ptr, z_ptr, rb, N, kt_total, n_groups, BN: tl.constexpr,
               TR: tl.constexpr = 0):
    """Word pointers [BN, 16] (chunk 0) and their chunk step (``dequant._word_ptrs``), and
    scale / zero row pointers [BN, 1] of row block rb (rows past N clamped to N - 1: they are
    loaded, never written)."""
    rows = tl.minimum(rb * BN + tl.arange(0, BN), N - 1)
    q_ptrs, qs = _word_ptrs(q_ptr, rows, N, kt_total, TR)
    return q_ptrs, qs, s_ptr + rows[:, None] * n_groups, z_ptr + rows[:, None] * n_groups


@triton.jit
def _gemv_fetch(q_ptr, s_ptr, z_ptr, rb, kt, ok, N, kt_total, n_groups, GROUP: tl.constexpr,
                BN: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
                USE_ASM: tl.constexpr, TR: tl.constexpr = 0):
    """Words of chunk kt of row block rb (zeros unless ok) and its first group's scale."""
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    q_ptrs, qs, s_rows, z_rows = _gemv_rows(q_ptr, s_ptr, z_ptr, rb, N, kt_total, n_groups, BN,
                                            TR)
    q = tl.load(q_ptrs + kt * qs, mask=ok, other=0)
    if TR > 0:   # the tiled layout's byte-swapped pairs back to whole words
        q = _swap_pairs(q)
    ktc = tl.minimum(kt, kt_total - 1)
    g = ktc * GPC if GROUP < 128 else (ktc * 128) // GROUP
    s, zc = _gemv_scales(s_rows, z_rows, g, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
    return q, s, zc


@triton.jit
def _cursor_next(c, it, rb, kt0, kt_per, P, SPLIT_K):
    """Advance the persistent GEMV's load cursor one chunk: chunk c of item it (row block rb,
    K slice from chunk kt0); past the item's last chunk, on to the program's next item."""
    c += 1
    if c == kt_per:
        c = c * 0
        it += P
        rb = it // SPLIT_K
        kt0 = (it - rb * SPLIT_K) * kt_per
    return c, it, rb, kt0


@triton.jit
def _gemv_persistent(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, m, N, K, stride_xm,
                     stride_om, n_groups, SPLIT_K, GROUP: tl.constexpr, BN: tl.constexpr,
                     HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     ATOMIC: tl.constexpr, USE_ASM: tl.constexpr, IS_BF16: tl.constexpr,
                     AHEAD: tl.constexpr, TR: tl.constexpr = 0):
    """The GEMV with a persistent grid (``PERSIST``; see :func:`w4a16_gemv_kernel`).

    Work items are (row block, K slice of kt_per chunks), numbered with the slice fastest
    (the K_FAST order: consecutive items are neighbouring pieces of the same rows). Program
    p of P takes items p, p + P, p + 2P, ...: at any time the resident programs work on a
    contiguous run of items, i.e. a slab of whole rows. Its steps (item, chunk) are walked by
    two cursors: the load cursor fetches words and first-group scales AHEAD (1 or 2) steps
    before the compute cursor uses them, across item boundaries, so only the program's first
    chunk starts cold. After an item's last chunk its row sums are added (atomics with split-K,
    else stored) and the accumulator restarts. Item changes (the only integer divisions) come
    once per kt_per steps."""
    p = tl.program_id(1)
    P = tl.num_programs(1)
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    items = tl.cdiv(N, BN) * SPLIT_K
    steps = tl.cdiv(items - p, P) * kt_per
    rj = tl.arange(0, 16)[None, :]
    x_ptrs = x_ptr + m * stride_xm + rj
    zero = p * 0

    # load cursor: item l_it = (row block l_rb, slice starting at chunk l_kt0), chunk l_c
    l_it = p
    l_rb = p // SPLIT_K
    l_kt0 = (p - l_rb * SPLIT_K) * kt_per
    l_c = zero
    q1, s1, z1 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt0, (l_it < items) & (l_kt0 < kt_total),
                             N, kt_total, n_groups, GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM, TR)
    l_c, l_it, l_rb, l_kt0 = _cursor_next(l_c, l_it, l_rb, l_kt0, kt_per, P, SPLIT_K)
    q2, s2, z2 = q1, s1, z1
    if AHEAD == 2:
        l_kt = l_kt0 + l_c
        q2, s2, z2 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt,
                                 (l_it < items) & (l_kt < kt_total), N, kt_total, n_groups,
                                 GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM, TR)
        l_c, l_it, l_rb, l_kt0 = _cursor_next(l_c, l_it, l_rb, l_kt0, kt_per, P, SPLIT_K)

    # compute cursor
    c_rb = p // SPLIT_K
    c_pk = p - c_rb * SPLIT_K
    c_it = p
    c_c = zero
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    for _ in range(0, steps):
        q, sa, za = q1, s1, z1
        l_kt = l_kt0 + l_c
        if AHEAD == 2:
            q1, s1, z1 = q2, s2, z2
            q2, s2, z2 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt,
                                     (l_it < items) & (l_kt < kt_total), N, kt_total, n_groups,
                                     GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM, TR)
        else:
            q1, s1, z1 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt,
                                     (l_it < items) & (l_kt < kt_total), N, kt_total, n_groups,
                                     GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM, TR)
        l_c, l_it, l_rb, l_kt0 = _cursor_next(l_c, l_it, l_rb, l_kt0, kt_per, P, SPLIT_K)

        kt = c_pk * kt_per + c_c
        if kt < kt_total:  # the last K slice can be short
            c_q, c_qs, c_s, c_z = _gemv_rows(q_ptr, s_ptr, z_ptr, c_rb, N, kt_total, n_groups,
                                             BN, TR)
            acc = _gemv_chunk(acc, q, sa, za, kt, x_ptrs, c_s, c_z, n_groups, K, GROUP,
                              HAS_ZERO, EVEN_K, USE_ASM, IS_BF16)
        c_c += 1
        if c_c == kt_per:  # the item's last chunk: add its rows, move to the next item
            rn = c_rb * BN + tl.arange(0, BN)
            y = tl.sum(acc, axis=1)
            if HAS_BIAS:
                y += (tl.load(bias_ptr + tl.minimum(rn, N - 1)).to(tl.float32)
                      * (c_pk == 0).to(tl.float32))
            out_ptrs = out_ptr + m * stride_om + rn
            if ATOMIC:
                tl.atomic_add(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=rn < N,
                              sem="relaxed")
            else:
                tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=rn < N)
            acc = tl.zeros((BN, 16), dtype=tl.float32)
            c_c = zero
            c_it += P
            c_rb = c_it // SPLIT_K
            c_pk = c_it - c_rb * SPLIT_K


@triton.jit
def w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr = False,
    IS_BF16: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    K_FAST: tl.constexpr = True, PERSIST: tl.constexpr = False, AHEAD: tl.constexpr = 1,
    PIPE: tl.constexpr = None, QC: tl.constexpr = "", QE: tl.constexpr = "",
    TR: tl.constexpr = 0,
):
    """Decode path (one token per program along grid axis 0): CUDA-core GEMV.

    Each program owns BN output rows and a K range. A chunk's 16 words per row are loaded as a
    [BN, 16] tile (16 bytes per thread: 4 consecutive words of one row, so a thread meets the
    same 4 activation columns in every row it owns). Per chunk, each thread turns its 32
    activations into the 4 half-precision pairs and per-group sums once (:func:`~.ptx.xprep_asm`),
    then every word of every row it owns is dotted with them in packed half precision
    (:func:`~.ptx.gemv_asm`: about 2 instructions per weight); scale and zero apply once per
    (row, group, thread) in float32: acc += s * sum (u - 8) x + (zterm + 8 s) * sum x.
    Without USE_ASM (the interpreter) the same sums run in float32.

    PERSIST: grid (M, P) of persistent programs, each walking a strided list of
    (row block, K slice) items with its word loads AHEAD steps ahead (:func:`_gemv_persistent`).
    TR: the words' row blocks (``packing.tile_words``; 0 row by row).
    """
    if PERSIST:
        _gemv_persistent(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, tl.program_id(0), N, K,
                         stride_xm, stride_om, n_groups, SPLIT_K, GROUP, BN, HAS_ZERO, HAS_BIAS,
                         EVEN_K, ATOMIC, USE_ASM, IS_BF16, AHEAD, TR)
    else:
        _gemv_grid(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
                   n_groups, SPLIT_K, GROUP, BN, HAS_ZERO, HAS_BIAS, EVEN_K, ATOMIC, USE_ASM,
                   IS_BF16, PREFETCH, K_FAST, PIPE, QC, QE, TR)


@triton.jit
def _gemv_grid(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
               n_groups, SPLIT_K, GROUP: tl.constexpr, BN: tl.constexpr,
               HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
               ATOMIC: tl.constexpr, USE_ASM: tl.constexpr, IS_BF16: tl.constexpr,
               PREFETCH: tl.constexpr, K_FAST: tl.constexpr, PIPE: tl.constexpr,
               QC: tl.constexpr, QE: tl.constexpr, TR: tl.constexpr = 0):
    """The GEMV over a grid of one (token, K slice, row block) per program (PERSIST off)."""
    # Grid (M, SPLIT_K, row blocks) with K_FAST: programs that run together read whole rows
    # (contiguous memory); with the split slowest they read one K slice of every row instead,
    # 4-16 KB apart. Tokens vary fastest: the programs that share words run together.
    m = tl.program_id(0)
    if K_FAST:
        pid_k = tl.program_id(1)
        pid_n = tl.program_id(2)
    else:
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
    kt_total, kt0, kt1 = _k_slice(K, pid_k, SPLIT_K)
    rn, rn_safe, q_ptrs, qs = _row_words(q_ptr, pid_n, N, kt_total, BN, TR)
    rj = tl.arange(0, 16)[None, :]                                     # word in chunk
    x_ptrs = x_ptr + m * stride_xm + rj
    s_rows = s_ptr + rn_safe[:, None] * n_groups
    z_rows = z_ptr + rn_safe[:, None] * n_groups
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1   # groups per chunk

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    # PREFETCH 1: the next chunk's words load during this chunk; 2: its scales too (block 128)
    SPF: tl.constexpr = PREFETCH == 2 and GPC == 1
    q_next = _words_first(q_ptrs, qs, kt0, kt1, PREFETCH, QC, QE)
    if SPF:
        g_first = (tl.minimum(kt0, kt_total - 1) * 128) // GROUP
        s_next, z_next = _gemv_scales(s_rows, z_rows, g_first, n_groups, HAS_ZERO, EVEN_K,
                                      USE_ASM)
    for kt in tl.range(kt0, kt1, num_stages=PIPE):
        q, q_next = _words_next(q_ptrs, qs, q_next, kt, kt1, PREFETCH, QC, QE)
        if TR > 0:   # the tiled layout's byte-swapped pairs back to whole words
            q = _swap_pairs(q)
        g0 = kt * GPC if GROUP < 128 else (kt * 128) // GROUP
        if SPF:
            sa, za = s_next, z_next
            g1 = (tl.minimum(kt + 1, kt_total - 1) * 128) // GROUP
            s_next, z_next = _gemv_scales(s_rows, z_rows, g1, n_groups, HAS_ZERO, EVEN_K,
                                          USE_ASM)
        else:
            sa, za = _gemv_scales(s_rows, z_rows, g0, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
        acc = _gemv_chunk(acc, q, sa, za, kt, x_ptrs, s_rows, z_rows, n_groups, K, GROUP,
                          HAS_ZERO, EVEN_K, USE_ASM, IS_BF16)

    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn_safe).to(tl.float32) * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + m * stride_om + rn
    if ATOMIC:
        tl.atomic_add(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=rn < N, sem="relaxed")
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=rn < N)
