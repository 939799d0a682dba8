"""GPTQ's column loop over one lazy-update block as a single Triton kernel (imported only
when GPTQ rounds a CUDA weight, or by the tests under ``TRITON_INTERPRET=1``).

GPTQ rounds an ``[in, out]`` weight (transposed: one input column per row) column by column:
each column is quantized, its error divided by the inverse Hessian factor's diagonal, and the
error spread over the block's later columns. In PyTorch that is about ten small kernels per
column, so a Llama-3-8B decoder layer (26,624 input columns over its four groups of linears
that share an input) spends seconds launching them. Here one program owns ``BLOCK_N``
output features of a block of up to 128 columns, holds the block in registers and runs the
whole column loop; output features are independent, so the programs never talk.

The arithmetic is the PyTorch reference's, operation for operation (IEEE division, round half
to even, the same order of multiply and subtract), so the interpreter reproduces
:func:`modelopt_lite.algorithms.gptq._round_block` exactly; on a GPU the compiler may fuse a
multiply and a subtract, which moves the last bit now and then.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_block_kernel(W, U, Q, E, S, Z, K, cols, n_out,
                       stride_w, stride_u, stride_q, stride_e, stride_s, stride_z, stride_k,
                       qmin, qmax, HAS_ZERO: tl.constexpr, HAS_KEEP: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    in_n = offs_n < n_out
    in_c = offs_c < cols
    w = tl.load(W + offs_c[:, None] * stride_w + offs_n[None, :],
                mask=in_c[:, None] & in_n[None, :], other=0.0)        # [C, N] float32
    for i in range(cols):
        wi = tl.sum(tl.where(offs_c[:, None] == i, w, 0.0), axis=0)   # column i, [N]
        s = tl.load(S + i * stride_s + offs_n, mask=in_n, other=1.0)
        y = tl.math.div_rn(wi, s)
        if HAS_ZERO:
            z = tl.load(Z + i * stride_z + offs_n, mask=in_n, other=0.0)
            y = y + z
        r = y + 12582912.0   # 1.5 * 2**23: rounds |y| < 2**22 half to even, as torch
        q = tl.minimum(tl.maximum(r - 12582912.0, qmin), qmax)
        if HAS_ZERO:
            dq = (q - z) * s
        else:
            dq = q * s
        if HAS_KEEP:
            dq = dq * tl.load(K + i * stride_k + offs_n, mask=in_n, other=0).to(tl.float32)
        tl.store(Q + i * stride_q + offs_n, dq, mask=in_n)
        d = tl.load(U + i * stride_u + i)
        e = tl.math.div_rn(wi - dq, d)
        tl.store(E + i * stride_e + offs_n, e, mask=in_n)
        u = tl.load(U + i * stride_u + offs_c, mask=in_c & (offs_c > i), other=0.0)
        w = w - u[:, None] * e[None, :]


def gptq_round_block(w1: torch.Tensor, u1: torch.Tensor, q1: torch.Tensor, scale1, zero1,
                     qmin: int, qmax: int, keep1=None, block_n: int = 64) -> torch.Tensor:
    """The Triton form of GPTQ's per-block column loop: writes the dequantized codes of the
    ``[cols, out]`` block ``w1`` into ``q1`` and returns the scaled errors ``[cols, out]``.
    ``u1``: the block's ``[cols, cols]`` upper inverse-Cholesky factor; ``scale1`` /
    ``zero1`` (None when symmetric) / ``keep1`` (bool, None when dense): per element,
    ``[cols, out]``. float32, CUDA (or CPU under ``TRITON_INTERPRET=1``), ``cols <= 128``;
    ``w1`` is left as it was (the reference updates it in place; no caller reads it after)."""
    cols, n_out = w1.shape
    if cols > 128 or w1.dtype != torch.float32:
        raise ValueError(f"gptq_round_block takes float32 blocks of at most 128 columns, got "
                         f"{cols} columns of {w1.dtype}")
    tensors = [w1, u1, q1, scale1] + [t for t in (zero1, keep1) if t is not None]
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("gptq_round_block needs row-contiguous blocks")
    err = torch.empty_like(w1)
    zero = scale1 if zero1 is None else zero1
    keep = scale1 if keep1 is None else keep1
    block_c = max(16, 1 << (cols - 1).bit_length())
    grid = (-(-n_out // block_n),)
    # Triton launches on the current device: a layer on another GPU (device_map) sets it
    on = torch.cuda.device(w1.device) if w1.is_cuda else contextlib.nullcontext()
    with on:
        _gptq_block_kernel[grid](w1, u1, q1, err, scale1, zero, keep, cols, n_out,
                                 w1.stride(0), u1.stride(0), q1.stride(0), err.stride(0),
                                 scale1.stride(0), zero.stride(0), keep.stride(0), float(qmin),
                                 float(qmax), HAS_ZERO=zero1 is not None,
                                 HAS_KEEP=keep1 is not None, BLOCK_C=block_c, BLOCK_N=block_n,
                                 num_warps=4)
    return err
