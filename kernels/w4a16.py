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


ASM_F16_ZERO_0 = tl.constexpr(_asm(False, True, 0))
ASM_F16_ZERO_1 = tl.constexpr(_asm(False, True, 1))
ASM_F16_ZERO_2 = tl.constexpr(_asm(False, True, 2))
ASM_F16_ZERO_3 = tl.constexpr(_asm(False, True, 3))
ASM_F16_SYM_0 = tl.constexpr(_asm(False, False, 0))
ASM_F16_SYM_1 = tl.constexpr(_asm(False, False, 1))
ASM_F16_SYM_2 = tl.constexpr(_asm(False, False, 2))
ASM_F16_SYM_3 = tl.constexpr(_asm(False, False, 3))
ASM_BF16_ZERO_0 = tl.constexpr(_asm(True, True, 0))
ASM_BF16_ZERO_1 = tl.constexpr(_asm(True, True, 1))
ASM_BF16_ZERO_2 = tl.constexpr(_asm(True, True, 2))
ASM_BF16_ZERO_3 = tl.constexpr(_asm(True, True, 3))
ASM_BF16_SYM_0 = tl.constexpr(_asm(True, False, 0))
ASM_BF16_SYM_1 = tl.constexpr(_asm(True, False, 1))
ASM_BF16_SYM_2 = tl.constexpr(_asm(True, False, 2))
ASM_BF16_SYM_3 = tl.constexpr(_asm(True, False, 3))


def _gemv_asm(bf16: bool) -> str:
    """One packed word (8 nibbles) dotted with its 8 activations, as 4 float32 partial sums.

    Inputs: the word and four f16x2 (bf16x2) registers holding (x[16b + j], x[16(b+4) + j]),
    b = 0..3. Shifting the word by 4b and masking 0x000F000F puts planes b and b + 4 in the
    two 16-bit halves; OR-ing the half-precision 1024 (128 for bf16) and subtracting it gives
    (u_b, u_b+4) exactly; two planes are multiplied and summed per packed FMA. Outputs: the
    sums over planes (0, 1), (2, 3), (4, 5), (6, 7): any block of 32, 64 or 128 is a sum of them.
    """
    ty = "bf16x2" if bf16 else "f16x2"
    magic = "0x43004300" if bf16 else "0x64006400"
    cvt = "cvt.f32.bf16" if bf16 else "cvt.f32.f16"
    planes = []
    for b, acc in enumerate("aabb"):  # planes (b, b+4): b = 0, 1 -> a; b = 2, 3 -> b
        word = "$4" if b == 0 else "w"
        shift = "" if b == 0 else f"shr.u32 w, $4, {4 * b};\n"
        prod = f"mul.rn.{ty} {acc}, t, ${5 + b};" if b % 2 == 0 else \
            f"fma.rn.{ty} {acc}, t, ${5 + b}, {acc};"
        planes.append(f"{shift}lop3.b32 t, {word}, 0x000F000F, m, 0xEA;\n"
                      f"sub.rn.{ty} t, t, m;\n{prod}\n")
    return f"""
{{
.reg .b32 m, t, w, a, b;
.reg .b16 lo, hi;
mov.b32 m, {magic};
{"".join(planes)}mov.b32 {{lo, hi}}, a;
{cvt} $0, lo;
{cvt} $2, hi;
mov.b32 {{lo, hi}}, b;
{cvt} $1, lo;
{cvt} $3, hi;
}}
"""


ASM_GEMV_F16 = tl.constexpr(_gemv_asm(False))
ASM_GEMV_BF16 = tl.constexpr(_gemv_asm(True))


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
    if IS_BF16:
        if HAS_ZERO:
            if b == 0:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_ZERO_0)
            elif b == 1:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_ZERO_1)
            elif b == 2:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_ZERO_2)
            else:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_ZERO_3)
        else:
            if b == 0:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_SYM_0)
            elif b == 1:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_SYM_1)
            elif b == 2:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_SYM_2)
            else:
                lo, hi = _asm_bf16(q, s, z, ASM_BF16_SYM_3)
    else:
        if HAS_ZERO:
            if b == 0:
                lo, hi = _asm_f16(q, s, z, ASM_F16_ZERO_0)
            elif b == 1:
                lo, hi = _asm_f16(q, s, z, ASM_F16_ZERO_1)
            elif b == 2:
                lo, hi = _asm_f16(q, s, z, ASM_F16_ZERO_2)
            else:
                lo, hi = _asm_f16(q, s, z, ASM_F16_ZERO_3)
        else:
            if b == 0:
                lo, hi = _asm_f16(q, s, z, ASM_F16_SYM_0)
            elif b == 1:
                lo, hi = _asm_f16(q, s, z, ASM_F16_SYM_1)
            elif b == 2:
                lo, hi = _asm_f16(q, s, z, ASM_F16_SYM_2)
            else:
                lo, hi = _asm_f16(q, s, z, ASM_F16_SYM_3)
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
def w4a16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr = False, FUSE_K: tl.constexpr = False,
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

    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rm_safe = rm % M
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
    x_ptrs = x_ptr + rm_safe[None, :] * stride_xm + rj[:, None]
    s_rows = s_ptr + rn_safe * n_groups
    z_rows = z_ptr + rn_safe * n_groups
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1   # groups per chunk

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    rk = tl.arange(0, 128)
    xf_ptrs = x_ptr + rm_safe[:, None] * stride_xm + rk[None, :]    # [BM, 128], k contiguous
    for kt in range(kt0, kt1):
        q = tl.load(q_ptrs + kt * 16)
        for b in tl.static_range(4):          # byte b holds nibble planes 2b and 2b + 1
            if (b * 32) % (128 // GPC) == 0:  # first byte of a new group: fetch its scale
                if GROUP < 128:
                    g = kt * GPC + (b * 32) // GROUP
                else:
                    g = (kt * 128) // GROUP
                if not EVEN_K:  # the padded tail of the last chunk has no group of its own
                    g = tl.minimum(g, n_groups - 1)
                s = tl.load(s_rows + g)[:, None]
                if HAS_ZERO:
                    z = tl.load(z_rows + g)[:, None]
                else:
                    z = s
            if USE_ASM:
                lo, hi = _dequant_byte_asm(q, tl.broadcast_to(s, q.shape),
                                           tl.broadcast_to(z, q.shape), b, HAS_ZERO, IS_BF16)
            else:
                lo = _dequant_plane(q, s, z, 2 * b, HAS_ZERO, IS_BF16)
                hi = _dequant_plane(q, s, z, 2 * b + 1, HAS_ZERO, IS_BF16)
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


@triton.jit
def _group_scale(s_rows, z_rows, g, n_groups, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr):
    """(scale, zero term) of group g for the program's rows, in float32."""
    if not EVEN_K:  # the padded tail of the last chunk has no group of its own
        g = tl.minimum(g, n_groups - 1)
    s = tl.load(s_rows + g).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_rows + g).to(tl.float32)
    else:
        z = -8.0 * s
    return s, z


@triton.jit
def _pair(xa, xb):
    """Two half-precision vectors as one int32 vector of (xa, xb) pairs."""
    lo = xa.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = xb.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, USE_ASM: tl.constexpr = False,
    IS_BF16: tl.constexpr = False, PREFETCH: tl.constexpr = False,
):
    """Decode path (a few tokens): CUDA-core GEMV, one token per program along grid axis 2.

    Each program owns BN output rows and a K range; per 128-chunk the [BN, 16] packed words
    are read once (16-byte loads) and each word is dotted with its 8 activations. With
    USE_ASM, packed half-precision math does it (see :func:`_gemv_asm`: about 2.5
    instructions per weight) and returns float32 sums per pair of nibble planes; otherwise
    plain Triton isolates each plane with an AND, OR-s it into the float32 2^23 exponent and
    rebases it (exactly u * 2^(4 (i % 4))) for one float32 FMA per weight against activations
    pre-divided by that power of two. Scale and zero apply once per group and row in float32:
    acc += s * sum(u x) + zterm * sum(x). Rows are reduced once, at the end.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    kt_total = tl.cdiv(K, 128)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    rn = pid_n * BN + tl.arange(0, BN)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rj = tl.arange(0, 16)
    q_ptrs = q_ptr + rn_safe[:, None] * (kt_total * 16) + rj[None, :]
    x_row = x_ptr + m * stride_xm + rj
    s_rows = s_ptr + rn_safe * n_groups
    z_rows = z_ptr + rn_safe * n_groups
    PPG: tl.constexpr = GROUP // 16 if GROUP < 128 else 8   # nibble planes per group
    GPC: tl.constexpr = 128 // GROUP if GROUP < 128 else 1   # groups per chunk

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    if PREFETCH:  # the next chunk's words are in flight while this one is computed
        q_next = tl.load(q_ptrs + kt0 * 16, mask=kt0 < kt1, other=0)
    for kt in range(kt0, kt1):
        if PREFETCH:
            q = q_next
            q_next = tl.load(q_ptrs + (kt + 1) * 16, mask=kt + 1 < kt1, other=0)
        else:
            q = tl.load(q_ptrs + kt * 16)
        if USE_ASM:
            x_base = x_row + kt * 128
            if EVEN_K:
                x0 = tl.load(x_base)
                x1 = tl.load(x_base + 16)
                x2 = tl.load(x_base + 32)
                x3 = tl.load(x_base + 48)
                x4 = tl.load(x_base + 64)
                x5 = tl.load(x_base + 80)
                x6 = tl.load(x_base + 96)
                x7 = tl.load(x_base + 112)
            else:
                kk = kt * 128 + rj
                x0 = tl.load(x_base, mask=kk < K, other=0.0)
                x1 = tl.load(x_base + 16, mask=kk + 16 < K, other=0.0)
                x2 = tl.load(x_base + 32, mask=kk + 32 < K, other=0.0)
                x3 = tl.load(x_base + 48, mask=kk + 48 < K, other=0.0)
                x4 = tl.load(x_base + 64, mask=kk + 64 < K, other=0.0)
                x5 = tl.load(x_base + 80, mask=kk + 80 < K, other=0.0)
                x6 = tl.load(x_base + 96, mask=kk + 96 < K, other=0.0)
                x7 = tl.load(x_base + 112, mask=kk + 112 < K, other=0.0)
            shape: tl.constexpr = (BN, 16)
            xp0 = tl.broadcast_to(_pair(x0, x4)[None, :], shape)
            xp1 = tl.broadcast_to(_pair(x1, x5)[None, :], shape)
            xp2 = tl.broadcast_to(_pair(x2, x6)[None, :], shape)
            xp3 = tl.broadcast_to(_pair(x3, x7)[None, :], shape)
            if IS_BF16:
                asm: tl.constexpr = ASM_GEMV_BF16
            else:
                asm: tl.constexpr = ASM_GEMV_F16
            p01, p23, p45, p67 = tl.inline_asm_elementwise(
                asm, "=r,=r,=r,=r,r,r,r,r,r", [q, xp0, xp1, xp2, xp3],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
            xs01 = x0.to(tl.float32) + x1.to(tl.float32)
            xs23 = x2.to(tl.float32) + x3.to(tl.float32)
            xs45 = x4.to(tl.float32) + x5.to(tl.float32)
            xs67 = x6.to(tl.float32) + x7.to(tl.float32)
            if GROUP >= 128:
                s, z = _group_scale(s_rows, z_rows, (kt * 128) // GROUP, n_groups, HAS_ZERO,
                                    EVEN_K)
                acc += s[:, None] * ((p01 + p23) + (p45 + p67)) + \
                    z[:, None] * ((xs01 + xs23) + (xs45 + xs67))[None, :]
            elif GROUP == 64:
                s, z = _group_scale(s_rows, z_rows, kt * 2, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * (p01 + p23) + z[:, None] * (xs01 + xs23)[None, :]
                s, z = _group_scale(s_rows, z_rows, kt * 2 + 1, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * (p45 + p67) + z[:, None] * (xs45 + xs67)[None, :]
            else:  # GROUP == 32
                s, z = _group_scale(s_rows, z_rows, kt * 4, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * p01 + z[:, None] * xs01[None, :]
                s, z = _group_scale(s_rows, z_rows, kt * 4 + 1, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * p23 + z[:, None] * xs23[None, :]
                s, z = _group_scale(s_rows, z_rows, kt * 4 + 2, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * p45 + z[:, None] * xs45[None, :]
                s, z = _group_scale(s_rows, z_rows, kt * 4 + 3, n_groups, HAS_ZERO, EVEN_K)
                acc += s[:, None] * p67 + z[:, None] * xs67[None, :]
        else:
            q_hi = q >> 16
            t = tl.zeros((BN, 16), dtype=tl.float32)
            xs = tl.zeros((16,), dtype=tl.float32)
            for i in tl.static_range(8):
                sh = 4 * (i % 4)
                if i < 4:
                    bits = q & (0xF << sh)
                else:
                    bits = q_hi & (0xF << sh)
                v = (bits | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                k0 = kt * 128 + 16 * i
                if EVEN_K:
                    xi = tl.load(x_row + k0).to(tl.float32)
                else:
                    xi = tl.load(x_row + k0, mask=(k0 + rj) < K, other=0.0).to(tl.float32)
                t += v * (xi * (1.0 / (1 << sh)))[None, :]
                xs += xi
                if (i + 1) % PPG == 0:  # last plane of a group: scale and zero, once per row
                    s, z = _group_scale(s_rows, z_rows, kt * GPC + i // PPG if GROUP < 128
                                        else (kt * 128) // GROUP, n_groups, HAS_ZERO, EVEN_K)
                    acc += s[:, None] * t + z[:, None] * xs[None, :]
                    t = tl.zeros((BN, 16), dtype=tl.float32)
                    xs = tl.zeros((16,), dtype=tl.float32)

    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn_safe).to(tl.float32) * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + m * stride_om + rn
    if ATOMIC:
        tl.atomic_add(out_ptrs, y, mask=rn < N, sem="relaxed")
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=rn < N)
