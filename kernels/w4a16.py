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
partial tiles into a float32 buffer with atomics. The dequantization (about two instructions
per weight, no int-to-float conversion) is in ``dequant.py``.

Three more kernels serve the rest of the M range (``ops.py`` picks by config):
``gemv.w4a16_gemv_kernel`` (one token: CUDA cores, packed half-precision dot products, no
tensor-core tile to fill), ``mma.w4a16_mma_kernel`` (2..16 tokens: each word dequantized once
into ``mma.sync`` register fragments for all tokens, no shared memory) and
``dequant.w4a16_dequant_kernel`` (large M: W_hat written once in fp16, then one cuBLAS GEMM;
since v13 the fused kernel wins on the H100 table's shapes at M = 1024, and the GPUs and
shapes without a table keep this path from M = 512).
"""
import triton
import triton.language as tl

from .dequant import (_chunk_scale_zero, _dequant_byte, _k_slice, _pair_scale_zero,
                      _row_words, _swap_pairs, _tile_of)


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
    DOT_F32: tl.constexpr = False, FUSE_K: tl.constexpr = False, PAIRS: tl.constexpr = False,
    TR: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pn = tl.cdiv(N, BN)
    num_pm = tl.cdiv(M, BM)
    pid_n, pid_m = _tile_of(pid, num_pn, num_pm, GROUP_N)

    kt_total, kt0, kt1 = _k_slice(K, pid_k, SPLIT_K)
    if kt0 >= kt1:  # an empty K slice (split-K tail); returning here also keeps ptxas from
        return      # serializing the wgmma pipeline (the zero-trip path's zeroed accumulator)

    rn, rn_safe, q_ptrs, qs = _row_words(q_ptr, pid_n, N, kt_total, BN, TR)
    rm = pid_m * BM + tl.arange(0, BM)
    rm_safe = rm % M
    rj = tl.arange(0, 16)
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
        q = tl.load(q_ptrs + kt * qs)
        if TR > 0 and not USE_ASM:   # the plain planes read whole words: pairs back once
            q = _swap_pairs(q)
        for b in tl.static_range(4):          # byte b holds nibble planes 2b and 2b + 1
            if (b * 32) % (128 // GPC) == 0:  # first byte of a new group: fetch its scale
                if PAIRS:
                    s, z = _pair_scale_zero(s_rows, kt, b, n_groups, GPC, GROUP, EVEN_K,
                                            IS_BF16, USE_ASM, g_stride)
                else:
                    s, z = _chunk_scale_zero(s_rows, z_rows, kt, b, n_groups, GPC, GROUP,
                                             EVEN_K, HAS_ZERO)
            lo, hi = _dequant_byte(q, s, z, b, USE_ASM, HAS_ZERO, IS_BF16, TR > 0)
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
