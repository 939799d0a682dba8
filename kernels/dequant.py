"""INT4 -> fp16 / bf16 dequantization shared by the W4A16 kernels, and the kernel that writes
W_hat once in the activation dtype (``w4a16_dequant_kernel``, the large-M fallback that hands
the product to cuBLAS).

Two adjacent packed words go through one PRMT that puts byte b of each into the two 16-bit
halves of a register; one LOP3 with 0x000F000F | 0x6400 (fp16) or 0x4300 (bf16) turns two
nibbles into the half-precision numbers magic + u with no int-to-float conversion; one packed
subtract and one packed FMA with (scale, -zero*scale) finish: about two instructions per
weight (1.75 for fp16, whose odd planes need no shift: :func:`_asm`). Byte b of a word holds
nibble planes 2b and 2b + 1 (``packing.py``). The interpreter runs the same arithmetic in plain
Triton.
"""
import triton
import triton.language as tl


def _asm(bf16: bool, zero: bool, byte: int, zero_offset: bool = False,
         odd_shift: bool = False, swapped: bool = False, shift: bool = True) -> str:
    """Dequantization of byte ``byte`` of two words (nibble planes 2b and 2b + 1): ``$4`` the
    scales, ``$5`` the zero terms (``zero``: u * s + zterm, one FMA) or, ``zero_offset``, the
    numbers magic + z of integer zero points z, subtracted before one multiply: (u - z) * s,
    exact before its one rounding. fp16 without ``zero_offset`` reads the odd plane in place:
    the mask 0x00F000F0 makes 1024 + 16 u, and one FMA by (1/16, -64) gives u (symmetric: -72,
    u - 8) exactly, where the even plane takes a shift and a subtract: the same numbers in
    one instruction fewer (``odd_shift``: the shift, as bf16 does, for A/B timings).
    ``swapped``: the words of the tiled layout (``packing.swap_pair_bytes``), where byte b of
    the pair is byte b mod 2 of word b // 2 and its other copy two bytes up: with ``shift`` a
    move or an 8-bit shift gathers it (no instruction for even bytes), without it one PRMT of
    that word alone (the instruction count of the row-by-row words' gather)."""
    ty = "bf16x2" if bf16 else "f16x2"
    magic = "0x43004300" if bf16 else "0x64006400"
    offset = magic if zero else ("0x43084308" if bf16 else "0x64086408")
    sel = hex(byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12)
    finish = (f"fma.rn.{ty} $OUT, t, $4, $5;" if zero and not zero_offset
              else f"mul.rn.{ty} $OUT, t, $4;")
    o = "$5" if zero_offset else "o"
    if swapped:
        word = "$2" if byte < 2 else "$3"
        if shift:
            gather = f"shr.u32 p, {word}, 8;" if byte % 2 else f"mov.b32 p, {word};"
        else:   # bytes (b mod 2, b mod 2, b mod 2 + 2, b mod 2 + 2) of the one word
            gather = f"prmt.b32 p, {word}, {word}, {'0x3311' if byte % 2 else '0x2200'};"
    else:
        gather = f"prmt.b32 p, $2, $3, {sel};"
    if bf16 or zero_offset or odd_shift:   # bf16's 7 mantissa bits cannot hold 16 u
        odd = f"""shr.u32 p, p, 4;
lop3.b32 t, p, 0x000F000F, m, 0xEA;
sub.rn.{ty} t, t, {o};"""
    else:   # 1024 + 16 u, times 1/16 (0x2C00), minus 64 (0xD400) or 72 (0xD480): exact
        odd = f"""mov.b32 d, 0x2C002C00;
mov.b32 c, {"0xD400D400" if zero else "0xD480D480"};
lop3.b32 t, p, 0x00F000F0, m, 0xEA;
fma.rn.f16x2 t, t, d, c;"""
    return f"""
{{
.reg .b32 p, t, m, o, d, c;
mov.b32 m, {magic};
mov.b32 o, {offset};
{gather}
lop3.b32 t, p, 0x000F000F, m, 0xEA;
sub.rn.{ty} t, t, {o};
{finish.replace("$OUT", "$0")}
{odd}
{finish.replace("$OUT", "$1")}
}}
"""


@triton.jit
def _k_slice(K, pid_k, SPLIT_K):
    """The 128-wide chunks along K (kt_total) and program pid_k's share kt0 .. kt1 - 1 of them
    when they are split SPLIT_K ways (empty for a split-K tail)."""
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    return kt_total, kt0, tl.minimum(kt0 + kt_per, kt_total)


@triton.jit
def _tile_of(t, num_pn, num_pm, GROUP_N: tl.constexpr):
    """Output tile t as (row tile, token tile): GROUP_N row tiles at a time over all token
    tiles, so that the programs running together share their words and activations in L2
    (the fused kernel's grid; the warp-specialized kernel calls it from Gluon)."""
    width = GROUP_N * num_pm
    first_n = (t // width) * GROUP_N
    gsize = tl.minimum(num_pn - first_n, GROUP_N)
    return first_n + (t % width) % gsize, (t % width) // gsize


@triton.jit
def _row_words(q_ptr, pid_n, N, kt_total, BN: tl.constexpr, TR: tl.constexpr = 0):
    """Row tile pid_n: its rows rn, the same wrapped into [0, N) for loads (rn_safe), the
    [BN, 16] pointers to their chunk-0 packed words and the step to the next chunk's (16, or
    with TR > 0, words laid out in row blocks of TR (``packing.tile_words``): 16 x the block's
    rows, per row)."""
    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    q_ptrs, qs = _word_ptrs(q_ptr, rn_safe, N, kt_total, TR)
    return rn, rn_safe, q_ptrs, qs


@triton.jit
def _word_ptrs(q_ptr, rows, N, kt_total, TR: tl.constexpr):
    """[BN, 16] pointers to chunk 0's words of rows (in [0, N)) and the chunk step: 16, or with
    TR > 0 (tiled words) 16 x the rows of each row's block, [BN, 1]."""
    rj = tl.arange(0, 16)[None, :]
    if TR == 0:
        q_ptrs = q_ptr + rows[:, None] * (kt_total * 16) + rj
        qs = 16
    else:
        first = (rows // TR) * TR    # the row block's first row
        q_ptrs = q_ptr + (first * (kt_total * 16) + (rows - first) * 16)[:, None] + rj
        qs = (tl.minimum(N - first, TR) * 16)[:, None]
    return q_ptrs, qs


@triton.jit
def _words_first(q_ptrs, qs, kt0, kt1, PREFETCH: tl.constexpr, QC: tl.constexpr,
                 QE: tl.constexpr):
    """The word loop's prologue: with PREFETCH, chunk kt0's [BN, 16] words start loading
    (masked off for an empty K slice); without, nothing is in flight (a placeholder). qs: the
    chunk step (:func:`_row_words`)."""
    q_next = 0
    if PREFETCH:
        q_next = tl.load(q_ptrs + kt0 * qs, mask=kt0 < kt1, other=0, cache_modifier=QC,
                         eviction_policy=QE)
    return q_next


@triton.jit
def _words_next(q_ptrs, qs, q_next, kt, kt1, PREFETCH: tl.constexpr, QC: tl.constexpr,
                QE: tl.constexpr):
    """Chunk kt's words and what stays in flight: with PREFETCH the words loaded one step
    earlier, while chunk kt + 1's load is issued; without, chunk kt's words loaded now."""
    if PREFETCH:
        q = q_next
        q_next = tl.load(q_ptrs + (kt + 1) * qs, mask=kt + 1 < kt1, other=0, cache_modifier=QC,
                         eviction_policy=QE)
    else:
        q = tl.load(q_ptrs + kt * qs, cache_modifier=QC, eviction_policy=QE)
    return q, q_next


# the asm of byte b for (word layout, dtype, zero points): index 16 swapped + 8 bf16 + 4 zero + b
# (swapped words gathered by PRMT: the instruction stream these kernels were tuned with)
_DEQUANT_ASM = tl.constexpr(tuple(_asm(bf16, zero, b, swapped=sw, shift=False)
                                  for sw in (False, True)
                                  for bf16 in (False, True) for zero in (False, True)
                                  for b in range(4)))


@triton.jit
def _asm_f16(q, s, z, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r", [q, s, z],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _asm_bf16(q, s, z, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r", [q, s, z],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


@triton.jit
def _dequant_byte_asm(q, s, z, b: tl.constexpr, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr,
                      SWAP: tl.constexpr = False):
    """Nibble planes 2b and 2b+1 of q as two [BN, 16] half-precision tiles (SWAP: words of the
    tiled layout, their pairs' bytes swapped)."""
    asm: tl.constexpr = _DEQUANT_ASM[16 * SWAP + 8 * IS_BF16 + 4 * HAS_ZERO + b]
    if IS_BF16:
        lo, hi = _asm_bf16(q, s, z, asm)
    else:
        lo, hi = _asm_f16(q, s, z, asm)
    return lo, hi


@triton.jit
def _swap_pairs(q):
    """``packing.swap_pair_bytes`` of a [BN, 16] word tile (its own inverse): the tiled
    layout's words as row-by-row ones, for the paths that read whole words."""
    a, b = tl.split(tl.reshape(q, [q.shape[0], q.shape[1] // 2, 2]))
    lo = (a & 0xFFFF) | (b << 16)
    hi = ((a >> 16) & 0xFFFF) | (b & -65536)
    return tl.reshape(tl.join(lo, hi), q.shape)


@triton.jit
def _dequant_plane(q, s, z, i: tl.constexpr, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    """Nibble plane i of q as a [BN, 16] tile, in plain Triton (interpreter and fallback)."""
    u = (q >> (4 * i)) & 0xF
    if IS_BF16:  # float32 magic 2^23 + u: the interpreter has no bfloat16 bit casts
        v = (u | 0x4B000000).to(tl.float32, bitcast=True)
        magic = 8388608.0
        s = s.to(tl.float32)
        z = z.to(tl.float32)
    else:
        v = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        magic = 1024.0
    if HAS_ZERO:
        w = (v - tl.full((1, 1), magic, v.dtype)) * s + z
    else:
        w = (v - tl.full((1, 1), magic + 8.0, v.dtype)) * s
    if IS_BF16:
        return w.to(tl.bfloat16)
    return w.to(tl.float16)


@triton.jit
def _half(v, dt: tl.constexpr):
    """The low 16 bits of int32 ``v`` as a half-precision value of dtype ``dt``."""
    return v.to(tl.int16).to(dt, bitcast=True)


@triton.jit
def _chunk_group(kt, b: tl.constexpr, n_groups, GPC: tl.constexpr, GROUP: tl.constexpr,
                 EVEN_K: tl.constexpr):
    """Index of the group that byte ``b`` of chunk ``kt`` starts."""
    if GROUP < 128:
        g = kt * GPC + (b * 32) // GROUP
    else:
        g = (kt * 128) // GROUP
    if not EVEN_K:  # the padded tail of the last chunk has no group of its own
        g = tl.minimum(g, n_groups - 1)
    return g


@triton.jit
def _chunk_scale_zero(s_rows, z_rows, kt, b: tl.constexpr, n_groups, GPC: tl.constexpr,
                      GROUP: tl.constexpr, EVEN_K: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Scale and zero ([BN, 1]) of the group that byte ``b`` of chunk ``kt`` starts."""
    g = _chunk_group(kt, b, n_groups, GPC, GROUP, EVEN_K)
    s = tl.load(s_rows + g)[:, None]
    if HAS_ZERO:
        z = tl.load(z_rows + g)[:, None]
    else:
        z = s
    return s, z


@triton.jit
def _pair_scale_zero(sz_rows, kt, b: tl.constexpr, n_groups, GPC: tl.constexpr,
                     GROUP: tl.constexpr, EVEN_K: tl.constexpr, IS_BF16: tl.constexpr,
                     USE_ASM: tl.constexpr, g_stride=1):
    """Scale and zero term ([BN, 1]) from one 32-bit word per row and group (``pair_scales``;
    ``g_stride`` words from one group to the next: 1 in its [N, K/B] layout, N transposed).

    One 4-byte load per row instead of two 2-byte ones: the software pipeliner streams loads
    of 4 bytes or more with asynchronous copies, so the pair arrives with the words.
    """
    v = tl.load(sz_rows + _chunk_group(kt, b, n_groups, GPC, GROUP, EVEN_K) * g_stride)[:, None]
    if IS_BF16 and not USE_ASM:  # a bfloat16's bits are the top half of the float32 it equals
        s = (v << 16).to(tl.float32, bitcast=True)
        z = (v & -65536).to(tl.float32, bitcast=True)
    else:
        dt: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
        s = _half(v, dt)
        z = _half(v >> 16, dt)
    return s, z


@triton.jit
def _dequant_byte(q, s, z, b: tl.constexpr, USE_ASM: tl.constexpr, HAS_ZERO: tl.constexpr,
                  IS_BF16: tl.constexpr, SWAP: tl.constexpr = False):
    """The two nibble planes (2b, 2b + 1) of every word of ``q``, dequantized. SWAP: the asm
    reads the tiled layout's words as they are (``packing.swap_pair_bytes``); the plain-Triton
    planes read whole words, so callers swap a tiled chunk back once (:func:`_swap_pairs`)
    before its four bytes."""
    if USE_ASM:
        lo, hi = _dequant_byte_asm(q, tl.broadcast_to(s, q.shape), tl.broadcast_to(z, q.shape),
                                   b, HAS_ZERO, IS_BF16, SWAP)
    else:
        lo = _dequant_plane(q, s, z, 2 * b, HAS_ZERO, IS_BF16)
        hi = _dequant_plane(q, s, z, 2 * b + 1, HAS_ZERO, IS_BF16)
    return lo, hi


@triton.jit
def w4a16_dequant_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, n_groups, CHUNKS,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr,
    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, TR: tl.constexpr = 0,
):
    """W_hat [N, K] in the activation dtype, CHUNKS 128-chunks of BN rows per program (for
    large M, where one dequantization feeds a cuBLAS GEMM). TR: the words' row blocks
    (``packing.tile_words``; 0 row by row)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    kt_total = tl.cdiv(K, 128)
    kt0 = pid_k * CHUNKS
    kt1 = tl.minimum(kt0 + CHUNKS, kt_total)
    rn, rn_safe, q_ptrs, qs = _row_words(q_ptr, pid_n, N, kt_total, BN, TR)
    rj = tl.arange(0, 16)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rj[None, :]
    s_rows = s_ptr + rn_safe * n_groups
    z_rows = z_ptr + rn_safe * n_groups
    rmask = (rn < N)[:, None]
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    for kt in range(kt0, kt1):
        q = tl.load(q_ptrs + kt * qs)
        if TR > 0 and not USE_ASM:   # the plain planes read whole words: pairs back once
            q = _swap_pairs(q)
        for b in tl.static_range(4):
            if (b * 32) % (128 // GPC) == 0:
                s, z = _chunk_scale_zero(s_rows, z_rows, kt, b, n_groups, GPC, GROUP, EVEN_K,
                                         HAS_ZERO)
            lo, hi = _dequant_byte(q, s, z, b, USE_ASM, HAS_ZERO, IS_BF16, TR > 0)
            k_lo = kt * 128 + 32 * b
            if EVEN_K:
                tl.store(w_ptrs + k_lo, lo, mask=rmask)
                tl.store(w_ptrs + k_lo + 16, hi, mask=rmask)
            else:
                tl.store(w_ptrs + k_lo, lo, mask=rmask & ((k_lo + rj) < K)[None, :])
                tl.store(w_ptrs + k_lo + 16, hi, mask=rmask & ((k_lo + 16 + rj) < K)[None, :])
