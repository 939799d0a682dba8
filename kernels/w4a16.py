"""Triton W4A16 GEMM: y[M, N] = x[M, K] @ W_hat[N, K]^T with W_hat dequantized in registers.

Tiling. Each program owns a [BN x BM] tile of the *transposed* output, acc = W_hat_tile @ x^T,
so the dequantized weights are the left operand of ``tl.dot`` and stay in registers (on
Hopper, wgmma reads only its left operand from registers), while the activation tile
streams through shared memory. BN spans output features, BM tokens (16 is the smallest
tensor-core tile, so decode batches 1..16 share one tile), BK the reduction slice.
For small M the grid is too short to fill the GPU, so K is split over SPLIT_K programs that
add their partial tiles into a float32 buffer with atomics (split-K).

Packing (see ``packing.py``): each int32 word holds 8 consecutive K-codes in the nibble order
0,4,1,5,2,6,3,7, so ``(w >> 4r) & 0x000F000F`` yields codes (2r, 2r+1) as the two halves of a
word. OR-ing in 0x6400 (fp16) / 0x4300 (bf16) makes the half-precision numbers 1024 + u /
128 + u with no int-to-float conversion; one subtract and one FMA with (scale, -zero*scale)
finish the dequantization. On the GPU this runs as packed f16x2/bf16x2 PTX (4 weights per
two instructions); the interpreter runs the same arithmetic as plain Triton.
"""
import triton
import triton.language as tl

_ASM_HEAD = """
{
.reg .b32 s2, b2, m, t, r0, r1, r2, r3;
mov.b32 s2, {$9, $9};
mov.b32 b2, {$10, $10};
mov.b32 m, MAGIC;
lop3.b32 r0, $8, 0x000F000F, m, 0xEA;
shr.u32 t, $8, 4;
lop3.b32 r1, t, 0x000F000F, m, 0xEA;
shr.u32 t, $8, 8;
lop3.b32 r2, t, 0x000F000F, m, 0xEA;
shr.u32 t, $8, 12;
lop3.b32 r3, t, 0x000F000F, m, 0xEA;
mov.b32 m, OFFSET;
"""
_ASM_ZERO = """
sub.TY r0, r0, m;
sub.TY r1, r1, m;
sub.TY r2, r2, m;
sub.TY r3, r3, m;
fma.rn.TY r0, r0, s2, b2;
fma.rn.TY r1, r1, s2, b2;
fma.rn.TY r2, r2, s2, b2;
fma.rn.TY r3, r3, s2, b2;
"""
_ASM_SYM = """
sub.TY r0, r0, m;
sub.TY r1, r1, m;
sub.TY r2, r2, m;
sub.TY r3, r3, m;
mul.rn.TY r0, r0, s2;
mul.rn.TY r1, r1, s2;
mul.rn.TY r2, r2, s2;
mul.rn.TY r3, r3, s2;
"""
_ASM_TAIL = """
mov.b32 {$0, $1}, r0;
mov.b32 {$2, $3}, r1;
mov.b32 {$4, $5}, r2;
mov.b32 {$6, $7}, r3;
}
"""


def _asm(bf16: bool, zero: bool) -> str:
    body = _ASM_HEAD + (_ASM_ZERO if zero else _ASM_SYM) + _ASM_TAIL
    if bf16:
        body = body.replace("MAGIC", "0x43004300").replace("TY", "bf16x2")
        body = body.replace("OFFSET", "0x43004300" if zero else "0x43084308")
        return body.replace("sub.bf16x2", "sub.rn.bf16x2")
    body = body.replace("MAGIC", "0x64006400").replace("TY", "f16x2")
    body = body.replace("OFFSET", "0x64006400" if zero else "0x64086408")
    return body.replace("sub.f16x2", "sub.rn.f16x2")


ASM_F16_ZERO = tl.constexpr(_asm(False, True))
ASM_F16_SYM = tl.constexpr(_asm(False, False))
ASM_BF16_ZERO = tl.constexpr(_asm(True, True))
ASM_BF16_SYM = tl.constexpr(_asm(True, False))


@triton.jit
def _dequant_plain(q, s, z, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    e = tl.arange(0, 8)
    shifts = (e >> 1) * 4 + (e & 1) * 16
    u = (q[:, :, None] >> shifts[None, None, :]) & 0xF
    if IS_BF16:
        # float32 magic (2^23 + u): the interpreter has no bfloat16 bit casts
        v = (u | 0x4B000000).to(tl.float32, bitcast=True)
        magic = 8388608.0
        out_dtype = tl.bfloat16
        s = s.to(tl.float32)
        z = z.to(tl.float32)
    else:
        v = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        magic = 1024.0
        out_dtype = tl.float16
    if HAS_ZERO:
        w = (v - tl.full((1, 1, 1), magic, v.dtype)) * s[:, :, None] + z[:, :, None]
    else:
        w = (v - tl.full((1, 1, 1), magic + 8.0, v.dtype)) * s[:, :, None]
    return w.to(out_dtype)


@triton.jit
def _asm_call(q, s, z, asm: tl.constexpr, dt: tl.constexpr):
    return tl.inline_asm_elementwise(
        asm, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [q, s, z],
        dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True, pack=1)


@triton.jit
def _dequant_asm(q, s, z, HAS_ZERO: tl.constexpr, IS_BF16: tl.constexpr):
    if IS_BF16:
        if HAS_ZERO:
            o0, o1, o2, o3, o4, o5, o6, o7 = _asm_call(q, s, z, ASM_BF16_ZERO, tl.bfloat16)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = _asm_call(q, s, z, ASM_BF16_SYM, tl.bfloat16)
    else:
        if HAS_ZERO:
            o0, o1, o2, o3, o4, o5, o6, o7 = _asm_call(q, s, z, ASM_F16_ZERO, tl.float16)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = _asm_call(q, s, z, ASM_F16_SYM, tl.float16)
    w = tl.join(tl.join(tl.join(o0, o1), tl.join(o2, o3)),
                tl.join(tl.join(o4, o5), tl.join(o6, o7)))  # [..., i, j, k] = o[4k + 2j + i]
    return tl.permute(w, (0, 1, 4, 3, 2))


@triton.jit
def w4a16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, n_groups,
    GROUP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_F32: tl.constexpr = False,
):
    BKW: tl.constexpr = BK // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pn = tl.cdiv(N, BN)
    num_pm = tl.cdiv(M, BM)
    width = GROUP_N * num_pm
    first_n = (pid // width) * GROUP_N
    gsize = tl.minimum(num_pn - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % gsize
    pid_m = (pid % width) // gsize

    kt_total = tl.cdiv(K, BK)
    kt_per = tl.cdiv(kt_total, SPLIT_K)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, kt_total)

    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn_safe = tl.max_contiguous(tl.multiple_of(rn % N, BN), BN)
    rm_safe = rm % M
    rw = tl.arange(0, BKW)
    rk = tl.arange(0, BK)
    kw_total = K // 8
    q_ptrs = q_ptr + rn_safe[:, None] * kw_total + rw[None, :]
    x_ptrs = x_ptr + rm_safe[None, :] * stride_xm + rk[:, None]
    s_rows = rn_safe[:, None] * n_groups

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for kt in range(kt0, kt1):
        g = (kt * BK + rw * 8) // GROUP
        if EVEN_K:
            q = tl.load(q_ptrs + kt * BKW)
            xt = tl.load(x_ptrs + kt * BK)
            s = tl.load(s_ptr + s_rows + g[None, :])
            if HAS_ZERO:
                z = tl.load(z_ptr + s_rows + g[None, :])
            else:
                z = s
        else:
            wmask = (kt * BKW + rw) < kw_total
            q = tl.load(q_ptrs + kt * BKW, mask=wmask[None, :], other=0)
            xt = tl.load(x_ptrs + kt * BK, mask=((kt * BK + rk) < K)[:, None], other=0.0)
            s = tl.load(s_ptr + s_rows + g[None, :], mask=wmask[None, :], other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + s_rows + g[None, :], mask=wmask[None, :], other=0.0)
            else:
                z = s
        if USE_ASM:
            w = _dequant_asm(q, s, z, HAS_ZERO, IS_BF16)
        else:
            w = _dequant_plain(q, s, z, HAS_ZERO, IS_BF16)
        w = tl.reshape(w, (BN, BK))
        if DOT_F32:  # the interpreter's bfloat16 dot is wrong: multiply in float32 there
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)

    if HAS_BIAS:
        b = tl.load(bias_ptr + rn_safe).to(tl.float32)
        acc += b[:, None] * (pid_k == 0).to(tl.float32)
    out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
    omask = (rn[:, None] < N) & (rm[None, :] < M)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=omask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
