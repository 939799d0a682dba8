"""Triton W4A16 GEMM: y[M, N] = x[M, K] @ W_hat[N, K]^T with W_hat dequantized in registers.

Tiling. Each program owns a [BN x BM] tile of the *transposed* output, acc = W_hat @ x^T, so
the dequantized weights are the left operand of ``tl.dot`` and stay in registers (on Hopper,
wgmma reads only its left operand from registers) while activations stream through shared
memory. BN spans output features, BM tokens (16 is the smallest tensor-core tile, so decode
batches 1..16 share one tile). K advances one 128-wide chunk per iteration: the chunk's 16
int32 words per row are loaded once (16-byte loads), and nibble plane i of those words is
the [BN, 16] weight slice k = 16i .. 16i+15 (see ``packing.py``). Either each plane is
multiplied by its own [16, BM] activation slice (eight K=16 products per chunk; best at
M <= 4), or, with FUSE_K, the eight planes are joined into one [BN, 128] operand and one
K=128 product reads a single activation tile (fewer barriers; best from M = 16 up).
When the grid is too short to fill the GPU, K is split over SPLIT_K programs that add their
partial tiles into a float32 buffer with atomics.

Dequantization. Two adjacent words go through one PRMT that puts byte b of each into the
two 16-bit halves of a register; one LOP3 with 0x000F000F | 0x6400 (fp16) or 0x4300 (bf16)
turns two nibbles into the half-precision numbers magic + u with no int-to-float
conversion; one packed subtract and one packed FMA with (scale, -zero*scale) finish: about
two instructions per weight. The interpreter runs the same arithmetic in plain Triton.

Three more kernels serve the rest of the M range (``ops.py`` picks by config):
``w4a16_gemv_kernel`` (one token: CUDA cores, packed half-precision dot products, no
tensor-core tile to fill), ``w4a16_mma_kernel`` (2..16 tokens: each word dequantized once
into ``mma.sync`` register fragments for all tokens, no shared memory) and
``w4a16_dequant_kernel`` (large M: W_hat written once in fp16, then one cuBLAS GEMM; since
v13 the fused kernel wins on the H100 table's shapes at M = 1024, and the GPUs and shapes
without a table keep this path from M = 512).
"""
import triton
import triton.language as tl


def _asm(bf16: bool, zero: bool, byte: int) -> str:
    ty = "bf16x2" if bf16 else "f16x2"
    magic = "0x43004300" if bf16 else "0x64006400"
    offset = magic if zero else ("0x43084308" if bf16 else "0x64086408")
    sel = hex(byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12)
    finish = (f"fma.rn.{ty} $OUT, t, $4, $5;" if zero else f"mul.rn.{ty} $OUT, t, $4;")
    return f"""
{{
.reg .b32 p, t, m, o;
mov.b32 m, {magic};
mov.b32 o, {offset};
prmt.b32 p, $2, $3, {sel};
lop3.b32 t, p, 0x000F000F, m, 0xEA;
sub.rn.{ty} t, t, o;
{finish.replace("$OUT", "$0")}
shr.u32 p, p, 4;
lop3.b32 t, p, 0x000F000F, m, 0xEA;
sub.rn.{ty} t, t, o;
{finish.replace("$OUT", "$1")}
}}
"""


# the asm of byte b for (dtype, zero points): index 8 bf16 + 4 zero + b
_DEQUANT_ASM = tl.constexpr(tuple(_asm(bf16, zero, b) for bf16 in (False, True)
                                  for zero in (False, True) for b in range(4)))


@triton.jit
def _asm_f16(q, s, z, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r", [q, s, z],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _asm_bf16(q, s, z, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r,r,r,r", [q, s, z],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


@triton.jit
def _dequant_byte_asm(q, s, z, b: tl.constexpr, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    """Nibble planes 2b and 2b+1 of q as two [BN, 16] half-precision tiles."""
    asm: tl.constexpr = _DEQUANT_ASM[8 * IS_BF16 + 4 * HAS_ZERO + b]
    if IS_BF16:
        lo, hi = _asm_bf16(q, s, z, asm)
    else:
        lo, hi = _asm_f16(q, s, z, asm)
    return lo, hi


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
                  IS_BF16: tl.constexpr):
    """The two nibble planes (2b, 2b + 1) of every word of ``q``, dequantized."""
    if USE_ASM:
        lo, hi = _dequant_byte_asm(q, tl.broadcast_to(s, q.shape), tl.broadcast_to(z, q.shape),
                                   b, HAS_ZERO, IS_BF16)
    else:
        lo = _dequant_plane(q, s, z, 2 * b, HAS_ZERO, IS_BF16)
        hi = _dequant_plane(q, s, z, 2 * b + 1, HAS_ZERO, IS_BF16)
    return lo, hi


@triton.jit
def _mma(acc, w, x_ptrs, xk, K, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
    rj = tl.arange(0, 16)
    if EVEN_K:
        xt = tl.load(x_ptrs + xk)
    else:
        xt = tl.load(x_ptrs + xk, mask=((xk + rj) < K)[:, None], other=0.0)
    if DOT_F32:  # the interpreter's bfloat16 dot is wrong: multiply in float32 there
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
    return tl.dot(w, xt, acc)


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
    d = tl.arange(0, 128 * TB)
    e = d % 4
    h = (d // 4) % 2
    t = (d // 8) % 4
    r = (d // 32) % TB
    j = d // (32 * TB)
    row = mb * TB + r
    col = kt * 128 + 32 * j + 16 * h + 4 * t + e
    v = tl.load(x_ptr + row * stride_xm + col, mask=(row < M) & (col < K), other=0.0)
    tl.store(xp_ptr + (mb * tl.num_programs(1) + kt) * (128 * TB) + d, v)
    if n_out > 0:
        pid = mb * tl.num_programs(1) + kt
        z = tl.zeros([BLOCK], out_ptr.dtype.element_ty)
        for start in range(pid * zero_per_prog, (pid + 1) * zero_per_prog, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, z, mask=offs < n_out)


@triton.jit
def w4a16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr = False, FUSE_K: tl.constexpr = False, PAIRS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pn = tl.cdiv(N, BN)
    num_pm = tl.cdiv(M, BM)
    width = GROUP_N * num_pm
    first_n = (pid // width) * GROUP_N
    gsize = tl.minimum(num_pn - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % gsize
    pid_m = (pid % width) // gsize

    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)
    if kt0 >= kt1:  # an empty K slice (split-K tail); returning here also keeps ptxas from
        return      # serializing the wgmma pipeline (the zero-trip path's zeroed accumulator)

    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rm_safe = rm % M
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
    x_ptrs = x_ptr + rm_safe[None, :] * stride_xm + rj[:, None]
    s_rows = s_ptr + rn_safe * n_groups
    z_rows = z_ptr + rn_safe * n_groups
    g_stride = 1
    if PAIRS == 2:  # pairs transposed, [K/B, N]: a group's words of BN rows are contiguous
        s_rows = s_ptr + rn_safe
        g_stride = N
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1   # groups per chunk

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    rk = tl.arange(0, 128)
    xf_ptrs = x_ptr + rm_safe[:, None] * stride_xm + rk[None, :]    # [BM, 128], k contiguous
    for kt in range(kt0, kt1):
        q = tl.load(q_ptrs + kt * 16)
        for b in tl.static_range(4):          # byte b holds nibble planes 2b and 2b + 1
            if (b * 32) % (128 // GPC) == 0:  # first byte of a new group: fetch its scale
                if PAIRS:
                    s, z = _pair_scale_zero(s_rows, kt, b, n_groups, GPC, GROUP, EVEN_K,
                                            IS_BF16, USE_ASM, g_stride)
                else:
                    s, z = _chunk_scale_zero(s_rows, z_rows, kt, b, n_groups, GPC, GROUP,
                                             EVEN_K, HAS_ZERO)
            lo, hi = _dequant_byte(q, s, z, b, USE_ASM, HAS_ZERO, IS_BF16)
            if FUSE_K:  # collect the planes into one [BN, 128] operand, one product per chunk
                if b == 0:
                    p0 = tl.join(lo, hi)
                elif b == 1:
                    p1 = tl.join(lo, hi)
                elif b == 2:
                    p2 = tl.join(lo, hi)
                else:
                    p3 = tl.join(lo, hi)
            else:
                acc = _mma(acc, lo, x_ptrs, kt * 128 + 32 * b, K, EVEN_K, DOT_F32)
                acc = _mma(acc, hi, x_ptrs, kt * 128 + 32 * b + 16, K, EVEN_K, DOT_F32)
        if FUSE_K:
            w = tl.join(tl.join(p0, p1), tl.join(p2, p3))     # [BN, 16, h, b0, b1]
            w = tl.reshape(tl.permute(w, (0, 4, 3, 2, 1)), (BN, 128))
            if EVEN_K:
                xt = tl.trans(tl.load(xf_ptrs + kt * 128))
            else:
                xt = tl.trans(tl.load(xf_ptrs + kt * 128, mask=((kt * 128 + rk) < K)[None, :],
                                      other=0.0))
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
            else:
                acc = tl.dot(w, xt, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn_safe).to(tl.float32)
        acc += bias[:, None] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
    omask = (rn[:, None] < N) & (rm[None, :] < M)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def _gemv_asm(bf16: bool, groups_per_chunk: int) -> str:
    """One packed word dotted with its 8 activations: (u - 8) * x summed in half precision.

    Inputs (after the 2 or 4 outputs): the word, then four f16x2 (bf16x2) pairs
    xp_b = (x[16b + j], x[16(b+4) + j]), b = 0..3. The mask 0x000F000F OR-ed with the
    half-precision 1024 (bf16: 128) gives (1024 + u_b, 1024 + u_b+4); subtracting 1032 (136)
    leaves (u - 8) exactly, centred so the half-precision products stay small. fp16 reads
    planes 1 and 3 in place (mask 0x00F000F0: 1024 + 16 u, minus 1152 = 16 (u - 8), against
    activations pre-divided by 16; exact), so one shift per word serves all eight planes;
    bf16 (7 mantissa bits) shifts per plane pair.
    Outputs, float32: one sum per group of the chunk: planes 0-3 and 4-7 (1 or 2 groups per
    chunk), or planes 0-1, 2-3, 4-5, 6-7 (block 32).
    """
    ty = "bf16x2" if bf16 else "f16x2"
    cvt = "cvt.f32.bf16" if bf16 else "cvt.f32.f16"
    n_out = 4 if groups_per_chunk == 4 else 2
    q = f"${n_out}"
    lines = ["mov.b32 m, " + ("0x43004300;" if bf16 else "0x64006400;"),
             "mov.b32 o, " + ("0x43084308;" if bf16 else "0x64086408;")]
    if not bf16:
        lines.append("mov.b32 o16, 0x64806480;")
    for b in range(4):
        acc = "a" if (n_out == 2 or b < 2) else "c"
        xp = f"${n_out + 1 + b}"
        if bf16:
            src = q if b == 0 else "w"
            if b:
                lines.append(f"shr.u32 w, {q}, {4 * b};")
            lines.append(f"lop3.b32 t, {src}, 0x000F000F, m, 0xEA;")
            lines.append(f"sub.rn.{ty} t, t, o;")
        else:
            src = q if b < 2 else "w"
            if b == 2:
                lines.append(f"shr.u32 w, {q}, 8;")
            mask, off = ("0x000F000F", "o") if b % 2 == 0 else ("0x00F000F0", "o16")
            lines.append(f"lop3.b32 t, {src}, {mask}, m, 0xEA;")
            lines.append(f"sub.rn.{ty} t, t, {off};")
        first = b == 0 or (n_out == 4 and b == 2)
        lines.append(f"mul.rn.{ty} {acc}, t, {xp};" if first else
                     f"fma.rn.{ty} {acc}, t, {xp}, {acc};")
    lines += ["mov.b32 {lo, hi}, a;", f"{cvt} $0, lo;"]
    if n_out == 2:
        lines.append(f"{cvt} $1, hi;")
    else:  # a: planes (0,1 | 4,5), c: planes (2,3 | 6,7)
        lines += [f"{cvt} $2, hi;", "mov.b32 {lo, hi}, c;", f"{cvt} $1, lo;", f"{cvt} $3, hi;"]
    body = "\n".join(lines)
    return f"""
{{
.reg .b32 m, o, o16, t, w, a, c;
.reg .b16 lo, hi;
{body}
}}
"""


def _xprep_asm(bf16: bool, groups_per_chunk: int) -> str:
    """Eight activations x[16i + j], i = 0..7 (as 16-bit integers $n_out..), into the four
    pairs the GEMV asm reads (fp16: pairs 1 and 3 divided by 16, exact) and the float32 sum
    of x per group of the chunk (same order as :func:`_gemv_asm`'s outputs)."""
    ty = "bf16x2" if bf16 else "f16x2"
    n_s = 4 if groups_per_chunk == 4 else 2
    x = [f"${4 + n_s + i}" for i in range(8)]
    lines = []
    for b in range(4):
        if bf16 or b % 2 == 0:
            lines.append(f"mov.b32 ${b}, {{{x[b]}, {x[b + 4]}}};")
        else:
            lines.append(f"mov.b32 p{b}, {{{x[b]}, {x[b + 4]}}};")
            lines.append(f"mul.rn.{ty} ${b}, p{b}, d;")
    if bf16:  # bf16 sums in float32 (bf16 -> f32 is exact)
        lines += [f"cvt.f32.bf16 f{i}, {x[i]};" for i in range(8)]
        if n_s == 2:
            lines += ["add.f32 f0, f0, f1;", "add.f32 f2, f2, f3;", "add.f32 $4, f0, f2;",
                      "add.f32 f4, f4, f5;", "add.f32 f6, f6, f7;", "add.f32 $5, f4, f6;"]
        else:
            lines += ["add.f32 $4, f0, f1;", "add.f32 $5, f2, f3;", "add.f32 $6, f4, f5;",
                      "add.f32 $7, f6, f7;"]
    else:  # fp16 sums of 2 or 4 values in f16x2, then float32
        lines += [f"mov.b32 p0, {{{x[0]}, {x[4]}}};", f"mov.b32 p2, {{{x[2]}, {x[6]}}};",
                  "add.rn.f16x2 s, p0, p1;", "add.rn.f16x2 r, p2, p3;"]
        if n_s == 2:
            lines += ["add.rn.f16x2 s, s, r;", "mov.b32 {lo, hi}, s;", "cvt.f32.f16 $4, lo;",
                      "cvt.f32.f16 $5, hi;"]
        else:
            lines += ["mov.b32 {lo, hi}, s;", "cvt.f32.f16 $4, lo;", "cvt.f32.f16 $6, hi;",
                      "mov.b32 {lo, hi}, r;", "cvt.f32.f16 $5, lo;", "cvt.f32.f16 $7, hi;"]
    body = "\n".join(lines)
    return f"""
{{
.reg .b32 p0, p1, p2, p3, s, r, d;
.reg .f32 f0, f1, f2, f3, f4, f5, f6, f7;
.reg .b16 lo, hi;
mov.b32 d, 0x2C002C00;
{body}
}}
"""


ASM_GEMV_F16_2 = tl.constexpr(_gemv_asm(False, 2))
ASM_GEMV_F16_4 = tl.constexpr(_gemv_asm(False, 4))
ASM_GEMV_BF16_2 = tl.constexpr(_gemv_asm(True, 2))
ASM_GEMV_BF16_4 = tl.constexpr(_gemv_asm(True, 4))
ASM_XPREP_F16_2 = tl.constexpr(_xprep_asm(False, 2))
ASM_XPREP_F16_4 = tl.constexpr(_xprep_asm(False, 4))
ASM_XPREP_BF16_2 = tl.constexpr(_xprep_asm(True, 2))
ASM_XPREP_BF16_4 = tl.constexpr(_xprep_asm(True, 4))


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
def _gemv_rows(q_ptr, s_ptr, z_ptr, rb, N, kt_total, n_groups, BN: tl.constexpr):
    """Word pointers [BN, 16] (chunk 0) and scale / zero row pointers [BN, 1] of row block rb
    (rows past N clamped to N - 1: they are loaded, never written)."""
    rows = tl.minimum(rb * BN + tl.arange(0, BN), N - 1)
    q_ptrs = q_ptr + rows[:, None] * (kt_total * 16) + tl.arange(0, 16)[None, :]
    return q_ptrs, s_ptr + rows[:, None] * n_groups, z_ptr + rows[:, None] * n_groups


@triton.jit
def _gemv_fetch(q_ptr, s_ptr, z_ptr, rb, kt, ok, N, kt_total, n_groups, GROUP: tl.constexpr,
                BN: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
                USE_ASM: tl.constexpr):
    """Words of chunk kt of row block rb (zeros unless ok) and its first group's scale."""
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    q_ptrs, s_rows, z_rows = _gemv_rows(q_ptr, s_ptr, z_ptr, rb, N, kt_total, n_groups, BN)
    q = tl.load(q_ptrs + kt * 16, mask=ok, other=0)
    ktc = tl.minimum(kt, kt_total - 1)
    g = ktc * GPC if GROUP < 128 else (ktc * 128) // GROUP
    s, zc = _gemv_scales(s_rows, z_rows, g, n_groups, HAS_ZERO, EVEN_K, USE_ASM)
    return q, s, zc


@triton.jit
def _gemv_persistent(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, m, N, K, stride_xm,
                     stride_om, n_groups, SPLIT_K, GROUP: tl.constexpr, BN: tl.constexpr,
                     HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     ATOMIC: tl.constexpr, USE_ASM: tl.constexpr, IS_BF16: tl.constexpr,
                     AHEAD: tl.constexpr):
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
                             N, kt_total, n_groups, GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM)
    l_c += 1
    if l_c == kt_per:
        l_c = zero
        l_it += P
        l_rb = l_it // SPLIT_K
        l_kt0 = (l_it - l_rb * SPLIT_K) * kt_per
    q2, s2, z2 = q1, s1, z1
    if AHEAD == 2:
        l_kt = l_kt0 + l_c
        q2, s2, z2 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt,
                                 (l_it < items) & (l_kt < kt_total), N, kt_total, n_groups,
                                 GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM)
        l_c += 1
        if l_c == kt_per:
            l_c = zero
            l_it += P
            l_rb = l_it // SPLIT_K
            l_kt0 = (l_it - l_rb * SPLIT_K) * kt_per

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
                                     GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM)
        else:
            q1, s1, z1 = _gemv_fetch(q_ptr, s_ptr, z_ptr, l_rb, l_kt,
                                     (l_it < items) & (l_kt < kt_total), N, kt_total, n_groups,
                                     GROUP, BN, HAS_ZERO, EVEN_K, USE_ASM)
        l_c += 1
        if l_c == kt_per:
            l_c = zero
            l_it += P
            l_rb = l_it // SPLIT_K
            l_kt0 = (l_it - l_rb * SPLIT_K) * kt_per

        kt = c_pk * kt_per + c_c
        if kt < kt_total:  # the last K slice can be short
            c_q, c_s, c_z = _gemv_rows(q_ptr, s_ptr, z_ptr, c_rb, N, kt_total, n_groups, BN)
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
):
    """Decode path (one token per program along grid axis 0): CUDA-core GEMV.

    Each program owns BN output rows and a K range. A chunk's 16 words per row are loaded as a
    [BN, 16] tile (16 bytes per thread: 4 consecutive words of one row, so a thread meets the
    same 4 activation columns in every row it owns). Per chunk, each thread turns its 32
    activations into the 4 half-precision pairs and per-group sums once (:func:`_xprep_asm`),
    then every word of every row it owns is dotted with them in packed half precision
    (:func:`_gemv_asm`: about 2 instructions per weight); scale and zero apply once per
    (row, group, thread) in float32: acc += s * sum (u - 8) x + (zterm + 8 s) * sum x.
    Without USE_ASM (the interpreter) the same sums run in float32.

    PERSIST: grid (M, P) of persistent programs, each walking a strided list of
    (row block, K slice) items with its word loads AHEAD steps ahead (:func:`_gemv_persistent`).
    """
    if PERSIST:
        _gemv_persistent(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, tl.program_id(0), N, K,
                         stride_xm, stride_om, n_groups, SPLIT_K, GROUP, BN, HAS_ZERO, HAS_BIAS,
                         EVEN_K, ATOMIC, USE_ASM, IS_BF16, AHEAD)
    else:
        _gemv_grid(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
                   n_groups, SPLIT_K, GROUP, BN, HAS_ZERO, HAS_BIAS, EVEN_K, ATOMIC, USE_ASM,
                   IS_BF16, PREFETCH, K_FAST, PIPE, QC, QE)


@triton.jit
def _gemv_grid(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_om,
               n_groups, SPLIT_K, GROUP: tl.constexpr, BN: tl.constexpr,
               HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
               ATOMIC: tl.constexpr, USE_ASM: tl.constexpr, IS_BF16: tl.constexpr,
               PREFETCH: tl.constexpr, K_FAST: tl.constexpr, PIPE: tl.constexpr,
               QC: tl.constexpr, QE: tl.constexpr):
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
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rj = tl.arange(0, 16)[None, :]                                     # word in chunk
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj
    x_ptrs = x_ptr + m * stride_xm + rj
    s_rows = s_ptr + rn_safe[:, None] * n_groups
    z_rows = z_ptr + rn_safe[:, None] * n_groups
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1   # groups per chunk

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    # PREFETCH 1: the next chunk's words load during this chunk; 2: its scales too (block 128)
    SPF: tl.constexpr = PREFETCH == 2 and GPC == 1
    if PREFETCH:
        q_next = tl.load(q_ptrs + kt0 * 16, mask=kt0 < kt1, other=0, cache_modifier=QC,
                         eviction_policy=QE)
    if SPF:
        g_first = (tl.minimum(kt0, kt_total - 1) * 128) // GROUP
        s_next, z_next = _gemv_scales(s_rows, z_rows, g_first, n_groups, HAS_ZERO, EVEN_K,
                                      USE_ASM)
    for kt in tl.range(kt0, kt1, num_stages=PIPE):
        if PREFETCH:
            q = q_next
            q_next = tl.load(q_ptrs + (kt + 1) * 16, mask=kt + 1 < kt1, other=0,
                             cache_modifier=QC, eviction_policy=QE)
        else:
            q = tl.load(q_ptrs + kt * 16, cache_modifier=QC, eviction_policy=QE)
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


@triton.jit
def w4a16_dequant_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, n_groups, CHUNKS,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr,
    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr,
):
    """W_hat [N, K] in the activation dtype, CHUNKS 128-chunks of BN rows per program (for
    large M, where one dequantization feeds a cuBLAS GEMM)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    kt_total = tl.cdiv(K, 128)
    kt0 = pid_k * CHUNKS
    kt1 = tl.minimum(kt0 + CHUNKS, kt_total)
    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rj[None, :]
    s_rows = s_ptr + rn_safe * n_groups
    z_rows = z_ptr + rn_safe * n_groups
    rmask = (rn < N)[:, None]
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1
    for kt in range(kt0, kt1):
        q = tl.load(q_ptrs + kt * 16)
        for b in tl.static_range(4):
            if (b * 32) % (128 // GPC) == 0:
                s, z = _chunk_scale_zero(s_rows, z_rows, kt, b, n_groups, GPC, GROUP, EVEN_K,
                                         HAS_ZERO)
            lo, hi = _dequant_byte(q, s, z, b, USE_ASM, HAS_ZERO, IS_BF16)
            k_lo = kt * 128 + 32 * b
            if EVEN_K:
                tl.store(w_ptrs + k_lo, lo, mask=rmask)
                tl.store(w_ptrs + k_lo + 16, hi, mask=rmask)
            else:
                tl.store(w_ptrs + k_lo, lo, mask=rmask & ((k_lo + rj) < K)[None, :])
                tl.store(w_ptrs + k_lo + 16, hi, mask=rmask & ((k_lo + 16 + rj) < K)[None, :])


_FRAG_SRC = ((0, 0), (1, 0), (0, 2), (1, 2))   # (slot, first word) of A fragments a0..a3


def _x_address_ptx(xperm: bool, n_tiles: int, xaddr: str, mm1: str, stride: str) -> list[str]:
    """PTX: lane, g, tt and each token tile's activation address xa0 / xa1 (see mma_asm)."""
    lines = ["mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 tt, lane, 3;"]
    if xperm:  # lane (g, t): byte 64 g + 16 t of each load's block; tile 1 is 8 tokens on
        return lines + ["mul.wide.u32 off, lane, 16;", f"add.s64 xa0, {xaddr}, off;",
                        "add.s64 xa1, xa0, 512;"]
    lines += [f"min.u32 tok, g, {mm1};", f"mul.wide.u32 off, tok, {stride};",
              f"add.s64 xa0, {xaddr}, off;", "mul.wide.u32 off, tt, 8;",
              "add.s64 xa0, xa0, off;"]
    if n_tiles == 2:
        lines += ["add.u32 tok, g, 8;", f"min.u32 tok, tok, {mm1};",
                  f"mul.wide.u32 off, tok, {stride};", f"add.s64 xa1, {xaddr}, off;",
                  "mul.wide.u32 off, tt, 8;", "add.s64 xa1, xa1, off;"]
    return lines


def _prmt_ptx(b: int, rows: int, q: list[str]) -> list[str]:
    """PTX: byte b of each A fragment's word pair into the halves of p{pair}_{fragment}."""
    sel = hex(b | b << 4 | (4 + b) << 8 | (4 + b) << 12)
    return [f"prmt.b32 p{pr}_{f}, {q[4 * (2 * pr + slot) + w]}, "
            f"{q[4 * (2 * pr + slot) + w + 1]}, {sel};"
            for pr in range(rows // 2) for f, (slot, w) in enumerate(_FRAG_SRC)]


def _x_load_ptx(i: int, tile: int, n_tiles: int, xperm: bool, even_k: bool,
                krem: str) -> list[str]:
    """PTX: the B fragment (x{tile}_0, x{tile}_1) of nibble plane i for one token tile."""
    xb = f"x{tile}_0, x{tile}_1"
    if xperm:  # one 16-byte load per plane pair: (plane 2b: r0, r1; 2b+1: r2, r3)
        if i % 2 == 0:
            return [f"ld.global.nc.v4.b32 {{{xb}, y{tile}_0, y{tile}_1}}, "
                    f"[xa{tile}+{(i // 2) * 64 * 8 * n_tiles}];"]
        return [f"mov.b32 x{tile}_0, y{tile}_0;", f"mov.b32 x{tile}_1, y{tile}_1;"]
    if even_k:
        return [f"ld.global.nc.v2.b32 {{{xb}}}, [xa{tile}+{32 * i}];"]
    # planes past K read zeros (their padding codes are not zero weights)
    return [f"mov.b32 x{tile}_0, 0;", f"mov.b32 x{tile}_1, 0;",
            f"setp.lt.s32 pk, {16 * i}, {krem};",
            f"@pk ld.global.nc.v2.b32 {{{xb}}}, [xa{tile}+{32 * i}];"]


def mma_asm(bf16: bool, zero: bool, groups_per_chunk: int, n_tiles: int, even_k: bool,
            rows: int = 2, xperm: bool = False) -> str:
    """One chunk (128 k) of the small-M tensor-core GEMV for one thread: ``rows`` rows x 4 words.

    Thread layout (the [BN, 16] int32 tile's blocked layout: 4 consecutive words of a row
    per thread, 8 x 4 threads per warp, BN = 8 rows num_warps): lane = 4 g + t holds words
    4t .. 4t+3 of its rows (slots 0 .. rows-1). That is the A-fragment layout of
    ``mma.m16n8k16`` with mma rows (g, g + 8) = slots (2p, 2p + 1) and, for nibble plane i,
    mma k (2t, 2t+1) = words (4t, 4t+1) and k (2t+8, 2t+9) = words (4t+2, 4t+3): K is a
    sum, so any fixed permutation of it works when the activations follow it. One PRMT per
    word pair and byte puts byte b of both words in the two halves of a register; LOP3 with
    the half-precision magic gives plane 2b (then plane 2b+1 after a shift) as f16x2; a
    packed subtract and FMA with (scale, zterm) finish the weight, exactly as in :func:`_asm`.
    The B fragment of plane i is x[token][16i + 4t .. 16i + 4t + 3], one 8-byte load per
    token tile (tokens g and g + 8, clamped to M - 1), addressed from %laneid and shared by
    the thread's row pairs. Each word is dequantized once and used by every token.

    Operands (pack 4 rows): the accumulators out, 4 per slot: (tile 0 c0, c1, tile 1 c0, c1)
    for slot 2p, (tile 0 c2, c3, tile 1 c2, c3) for slot 2p + 1, i.e. column c = 4t + j holds
    token 2t + (j & 1) + 8 (j >> 1); then the words, 4 scale and 4 zterm tensors (groups of
    the chunk; two half-precision values per register), the accumulators in, the chunk's x
    address (b64), M - 1, the x row stride in bytes and the K left in this chunk.

    With ``xperm`` the activations come pre-permuted once per call (:func:`permute_x`): per
    chunk and load j = 0..3 a [8 n_tiles tokens, 4 t, planes 2j and 2j + 1, 4 halves] block,
    so a lane fetches both planes' B fragments with one 16-byte load and a warp's load reads
    512 contiguous bytes per token tile (4 lines instead of 8 lines for 8 bytes a lane).
    Tokens and K are zero-padded there, so no clamp and no K predicate; the address operand
    is the chunk's block, and M - 1, the stride and the K left are unused.
    """
    n = 4 * rows                        # elements per thread
    ty = "bf16x2" if bf16 else "f16x2"
    ab = "bf16" if bf16 else "f16"
    magic = "0x43004300" if bf16 else "0x64006400"
    offset = magic if zero else ("0x43084308" if bf16 else "0x64086408")
    q = [f"${n + i}" for i in range(n)]
    sbase, zbase, abase = 2 * n, 2 * n + 2 * n, 2 * n + 4 * n
    sreg = [[f"${sbase + (n // 2) * j + 2 * r}" for r in range(rows)] for j in range(4)]
    zreg = [[f"${zbase + (n // 2) * j + 2 * r}" for r in range(rows)] for j in range(4)]
    acc_in = [f"${abase + i}" for i in range(n)]
    xaddr, mm1, stride, krem = (f"${abase + n * (1 + i)}" for i in range(4))
    lines = [f"mov.b32 m, {magic};", f"mov.b32 o, {offset};"]
    lines += [f"mov.b32 ${i}, {acc_in[i]};" for i in range(n)]
    lines += _x_address_ptx(xperm, n_tiles, xaddr, mm1, stride)
    # A fragment sources per row pair p (_FRAG_SRC): (slot, first word) for a0 (row g, k 2t..),
    # a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
    for b in range(4):
        lines += _prmt_ptx(b, rows, q)
        for i in (2 * b, 2 * b + 1):
            grp = {1: 0, 2: i // 4, 4: i // 2}[groups_per_chunk]
            for tile in range(n_tiles):
                lines += _x_load_ptx(i, tile, n_tiles, xperm, even_k, krem)
            for pr in range(rows // 2):
                for f, (slot, _) in enumerate(_FRAG_SRC):
                    sl = 2 * pr + slot
                    src = f"p{pr}_{f}"
                    if i % 2:
                        lines.append(f"shr.u32 {src}, {src}, 4;")
                    lines.append(f"lop3.b32 a{f}, {src}, 0x000F000F, m, 0xEA;")
                    lines.append(f"sub.rn.{ty} a{f}, a{f}, o;")
                    if zero:
                        lines.append(f"fma.rn.{ty} a{f}, a{f}, {sreg[grp][sl]}, "
                                     f"{zreg[grp][sl]};")
                    else:
                        lines.append(f"mul.rn.{ty} a{f}, a{f}, {sreg[grp][sl]};")
                for tile in range(n_tiles):
                    o0, o1 = 8 * pr, 8 * pr + 4      # slots 2p and 2p + 1
                    d = ((o0, o0 + 1, o1, o1 + 1) if tile == 0 else
                         (o0 + 2, o0 + 3, o1 + 2, o1 + 3))
                    dl = ", ".join(f"${v}" for v in d)
                    lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{{dl}}}, "
                                 f"{{a0, a1, a2, a3}}, {{x{tile}_0, x{tile}_1}}, {{{dl}}};")
    body = "\n".join(lines)
    pregs = ", ".join(f"p{pr}_{f}" for pr in range(rows // 2) for f in range(4))
    return f"""
{{
.reg .b32 m, o, {pregs}, a0, a1, a2, a3, x0_0, x0_1, x1_0, x1_1, y0_0, y0_1, y1_0, y1_1;
.reg .b32 lane, g, tt, tok;
.reg .b64 off, xa0, xa1;
.reg .pred pk;
{body}
}}
"""


def mma_fs_asm(bf16: bool, zero: bool, n_tiles: int, even_k: bool, rows: int = 2,
               xperm: bool = False, fold: bool = False) -> str:
    """:func:`mma_asm` with the scale applied in float32 after the products (``FS``; one group
    per chunk, i.e. block >= 128).

    Only the code goes to the tensor cores. FS 1 (``fold`` off): PRMT + LOP3 + one packed
    subtract give (u - 8) exactly (fp16 odd planes: the mask 0x00F000F0 reads 16 (u - 8) in
    place, against activations divided by 16, exact), so no shift and no packed FMA per weight
    pair. FS 2 (``fold``): not even the subtract: the A operand is the magic number plus the
    code as LOP3 leaves it (fp16: 1024 + u, odd planes 1024 + 16 u against x / 16; bf16:
    128 + u), exact in half precision, and the offsets come off in float32 with the sums of x.
    The eight planes of a chunk accumulate into a fresh float32 tile T per row pair and token
    tile, then acc += s T + c_e S_e + c_o S_o, with S_e, S_o the chunk's sums of x per token
    over the even and odd planes (one extra MMA per plane and token tile with an all-ones A,
    shared by all rows) and per row (float32, made by the caller from s and zterm):
    FS 1: c_e = c_o = zterm + 8 s (no S without zero points);
    FS 2, fp16: c_e = zterm - 1024 s, c_o = zterm - 64 s; bf16: c_e = c_o = zterm - 128 s
    (zterm = -8 s without zero points). The weights are never rounded to half precision.

    Operands (pack 4 rows, all 32-bit): the accumulators out (as :func:`mma_asm`), the words,
    s, c_e and c_o per element (element 4 r + w: slot r), the accumulators in, the x address
    (b64), M - 1, the x row stride in bytes and the K left.
    """
    n = 4 * rows
    ty = "bf16x2" if bf16 else "f16x2"
    ab = "bf16" if bf16 else "f16"
    q = [f"${n + i}" for i in range(n)]
    sreg = [f"${2 * n + 4 * r}" for r in range(rows)]
    ereg = [f"${3 * n + 4 * r}" for r in range(rows)]
    oreg = [f"${4 * n + 4 * r}" for r in range(rows)]
    acc_in = [f"${5 * n + i}" for i in range(n)]
    xaddr, mm1, stride, krem = (f"${6 * n + n * i}" for i in range(4))
    sums = zero or fold                  # S needed
    split_s = fold and not bf16          # separate S_e / S_o
    lines = ["mov.b32 m, " + ("0x43004300;" if bf16 else "0x64006400;"),
             "mov.b32 o, " + ("0x43084308;" if bf16 else "0x64086408;"),
             "mov.b32 o16, 0x64806480;", "mov.b32 d16, 0x2C002C00;",
             "mov.b32 one, " + ("0x3F803F80;" if bf16 else "0x3C003C00;"), "mov.b32 zf, 0;"]
    lines += [f"mov.b32 ${i}, {acc_in[i]};" for i in range(n)]
    lines += _x_address_ptx(xperm, n_tiles, xaddr, mm1, stride)
    zq = "{zf, zf, zf, zf}"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    for b in range(4):
        lines += _prmt_ptx(b, rows, q)
        for i in (2 * b, 2 * b + 1):
            odd16 = i % 2 == 1 and not bf16     # fp16 odd plane read in place (16 u)
            for tile in range(n_tiles):
                xb = f"x{tile}_0, x{tile}_1"
                lines += _x_load_ptx(i, tile, n_tiles, xperm, even_k, krem)
                if sums:  # S += ones x: the sums of x per token (all rows alike)
                    h = "o" if split_s and i % 2 else "e"
                    sq = ", ".join(f"s{h}{tile}_{e}" for e in range(4))
                    cin = zq if i < (2 if split_s else 1) else f"{{{sq}}}"
                    lines.append(f"{mma} {{{sq}}}, {{one, one, one, one}}, {{{xb}}}, {cin};")
                if odd16:
                    lines += [f"mul.rn.f16x2 x{tile}_0, x{tile}_0, d16;",
                              f"mul.rn.f16x2 x{tile}_1, x{tile}_1, d16;"]
            for pr in range(rows // 2):
                for f in range(4):
                    src = f"p{pr}_{f}"
                    if odd16:
                        lines.append(f"lop3.b32 a{f}, {src}, 0x00F000F0, m, 0xEA;")
                        if not fold:
                            lines.append(f"sub.rn.{ty} a{f}, a{f}, o16;")
                    else:
                        if i % 2:
                            lines.append(f"shr.u32 {src}, {src}, 4;")
                        lines.append(f"lop3.b32 a{f}, {src}, 0x000F000F, m, 0xEA;")
                        if not fold:
                            lines.append(f"sub.rn.{ty} a{f}, a{f}, o;")
                for tile in range(n_tiles):
                    t = ", ".join(f"t{pr}_{tile}_{e}" for e in range(4))
                    cin = zq if i == 0 else f"{{{t}}}"
                    lines.append(f"{mma} {{{t}}}, {{a0, a1, a2, a3}}, {{x{tile}_0, x{tile}_1}}, "
                                 f"{cin};")
    for pr in range(rows // 2):   # acc += c_e S_e + c_o S_o + s T
        for tile in range(n_tiles):
            o0, o1 = 8 * pr, 8 * pr + 4
            d = ((o0, o0 + 1, o1, o1 + 1) if tile == 0 else (o0 + 2, o0 + 3, o1 + 2, o1 + 3))
            for e in range(4):
                sl = 2 * pr + (e // 2)
                if sums:
                    lines.append(f"fma.rn.f32 ${d[e]}, se{tile}_{e % 2}, {ereg[sl]}, ${d[e]};")
                if split_s:
                    lines.append(f"fma.rn.f32 ${d[e]}, so{tile}_{e % 2}, {oreg[sl]}, ${d[e]};")
                lines.append(f"fma.rn.f32 ${d[e]}, t{pr}_{tile}_{e}, {sreg[sl]}, ${d[e]};")
    body = "\n".join(lines)
    pregs = ", ".join(f"p{pr}_{f}" for pr in range(rows // 2) for f in range(4))
    fregs = [f"t{pr}_{tile}_{e}" for pr in range(rows // 2) for tile in range(n_tiles)
             for e in range(4)]
    fregs += [f"s{h}{tile}_{e}" for h in "eo" for tile in range(2) for e in range(4)]
    return f"""
{{
.reg .b32 m, o, o16, d16, one, zf, {pregs}, a0, a1, a2, a3, x0_0, x0_1, x1_0, x1_1;
.reg .b32 y0_0, y0_1, y1_0, y1_1, lane, g, tt, tok;
.reg .f32 {", ".join(fregs)};
.reg .b64 off, xa0, xa1;
.reg .pred pk;
{body}
}}
"""


def mma_fs_constraints(rows: int = 2) -> str:
    n = 4 * rows
    return ",".join(["=r"] * n + ["r"] * (5 * n) + ["l"] * n + ["r"] * (3 * n))


def mma_constraints(rows: int = 2) -> str:
    n = 4 * rows
    return ",".join(["=r"] * n + ["r"] * n + ["r"] * (2 * n) + ["r"] * (2 * n) + ["r"] * n
                    + ["l"] * n + ["r"] * (3 * n))


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
    """Token of accumulator column c (see :func:`mma_asm`): 2 (c // 4) + c % 2 + 8 (c // 2 % 2)."""
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
    PAIRS: tl.constexpr = False,
):
    """Small-M path (M = 2..16 tokens per program): every packed word is dequantized once and
    multiplied with all the tokens on the tensor cores (``mma.sync`` m16n8k16 in inline asm,
    :func:`mma_asm`), with the dequantized weights and the activations going straight from
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
    after the MMAs (:func:`mma_fs_asm`, block >= 128). PAIRS (with SV > 1 and zero points):
    s_ptr holds :func:`~.packing.pair_scales`, and one 8- or 16-byte load per row brings the SV
    chunks' scales and zterms together.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    m0 = pid_m * 16
    m_left = tl.minimum(M - m0, 16)
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
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
            qa = tl.load(q_ptrs + kt2 * 16, cache_modifier=QC, eviction_policy=QE)
            qb = tl.load(q_ptrs + (kt2 + 1) * 16, cache_modifier=QC, eviction_policy=QE)
            if SV == 4:
                qc = tl.load(q_ptrs + (kt2 + 2) * 16, cache_modifier=QC, eviction_policy=QE)
                qd = tl.load(q_ptrs + (kt2 + 3) * 16, cache_modifier=QC, eviction_policy=QE)
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
        if PREFETCH:
            q_next = tl.load(q_ptrs + kt0 * 16, mask=kt0 < kt1, other=0, cache_modifier=QC,
                             eviction_policy=QE)
        for kt in tl.range(kt0, kt1, num_stages=PIPE):
            if PREFETCH:
                q = q_next
                q_next = tl.load(q_ptrs + (kt + 1) * 16, mask=kt + 1 < kt1, other=0,
                                 cache_modifier=QC, eviction_policy=QE)
            else:
                q = tl.load(q_ptrs + kt * 16, cache_modifier=QC, eviction_policy=QE)
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
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
