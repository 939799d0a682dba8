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
def w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups, SPLIT_K,
    GROUP: tl.constexpr, BN: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Decode path (a few tokens): CUDA-core GEMV, one token per program along grid axis 2.

    Each program owns BN output rows and a K range. Per 128-chunk the [BN, 16] packed words
    are read once (16-byte loads); nibble plane i is isolated with one AND (planes 4..7 after
    one 16-bit shift per word), OR-ed into the float32 2^23 exponent and rebased with one
    subtract, which gives u * 2^(4*(i % 4)) exactly; the matching activation slice is
    pre-divided by that power of two, so one FMA per weight accumulates sum_k u_k x_k. Scale
    and zero are applied once per group and row: acc += s * sum(u x) + zterm * sum(x).
    Rows are reduced once, at the end.
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

    acc = tl.zeros((BN, 16), dtype=tl.float32)
    for kt in range(kt0, kt1):
        q = tl.load(q_ptrs + kt * 16)
        q_hi = q >> 16
        t = tl.zeros((BN, 16), dtype=tl.float32)
        xs = tl.zeros((16,), dtype=tl.float32)
        for i in tl.static_range(8):
            sh: tl.constexpr = 4 * (i % 4)
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
                if GROUP < 128:
                    g = kt * (128 // GROUP) + i // PPG
                else:
                    g = (kt * 128) // GROUP
                if not EVEN_K:
                    g = tl.minimum(g, n_groups - 1)
                s = tl.load(s_rows + g).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_rows + g).to(tl.float32)
                else:
                    z = -8.0 * s
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
