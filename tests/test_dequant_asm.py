"""The dequantization asm of the fused and warp-specialized kernels (``dequant._asm``), run off
the GPU by a small interpreter of the PTX it uses, against an independent float64 reference.

CI has no GPU, and the interpreter (``TRITON_INTERPRET=1``) runs the kernels' plain-Triton
arithmetic, not their inline asm; this checks the asm's numbers: every code of every byte plane,
fp16 and bf16, with zero terms, symmetric and with integer zero points, each within the one
rounding the asm promises (bit for bit against the float64 value rounded once).
"""
import math
import re

import numpy as np
import pytest

import torch

from modelopt_lite.kernels.dequant import _asm
from modelopt_lite.kernels.packing import swap_pair_bytes


def _round_half(x: float, bf16: bool) -> int:
    """float64 -> fp16 / bf16 bits, rounded once to nearest even."""
    if not bf16:
        return int(np.array([x], dtype=np.float16).view(np.uint16)[0])
    if x == 0:
        return 0x8000 if math.copysign(1.0, x) < 0 else 0
    m, e = math.frexp(x)                      # x = m 2^e, 0.5 <= |m| < 1
    r = round(m * 256) / 256                  # 8 significant bits, ties to even
    return int(np.array([math.ldexp(r, e)], dtype=np.float32).view(np.uint32)[0]) >> 16


def _half(bits: int, bf16: bool) -> float:
    if bf16:
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _pair(reg: int, bf16: bool) -> tuple:
    return _half(reg & 0xFFFF, bf16), _half(reg >> 16, bf16)


def _pack(lo: float, hi: float, bf16: bool) -> int:
    return _round_half(lo, bf16) | _round_half(hi, bf16) << 16


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 (default mode): result byte i is byte sel[i] of {b, a} (selectors below 8)."""
    pool = a | b << 32
    return sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def run_ptx(text: str, args: dict) -> dict:
    """Run the straight-line PTX of one asm block: registers and $n operands as 32-bit ints;
    the half-precision pair ops compute in float64 and round once per result."""
    regs = dict(args)

    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        if op in ("mov.b32", "mov.u32"):
            regs[dst] = val(src[0])
        elif op == "prmt.b32":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3.b32":
            lut = int(src[3], 16)
            a, b, c = (val(t) for t in src[:3])
            regs[dst] = sum(((lut >> (((a >> i) & 1) << 2 | ((b >> i) & 1) << 1
                                       | ((c >> i) & 1))) & 1) << i for i in range(32))
        elif op == "shr.u32":
            regs[dst] = val(src[0]) >> val(src[1])
        elif m := re.fullmatch(r"(sub|mul|fma)\.rn\.(f16x2|bf16x2)", op):
            bf16 = m.group(2) == "bf16x2"
            ops = [_pair(val(t), bf16) for t in src]
            f = {"sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                 "fma": lambda a, b, c: a * b + c}[m.group(1)]
            regs[dst] = _pack(f(*(o[0] for o in ops)), f(*(o[1] for o in ops)), bf16)
        else:
            raise AssertionError(f"the interpreter does not know {op!r}")
    return regs


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("mode", ["zero", "symmetric", "integer_zero"])
@pytest.mark.parametrize("odd_shift", [False, True])
@pytest.mark.parametrize("swapped,shift", [(False, False), (True, True), (True, False)])
def test_dequant_asm_matches_float64(bf16, mode, odd_shift, swapped, shift):
    """``swapped``: the tiled layout's word pairs (``packing.swap_pair_bytes``) go in, gathered
    by a move / shift (``shift``) or one PRMT, and the planes of the row-by-row words must come
    out."""
    rng = np.random.default_rng(0)
    for byte in range(4):
        text = _asm(bf16, mode != "symmetric", byte, mode == "integer_zero", odd_shift, swapped,
                    shift)
        for trial in range(48):
            words = [int(w) for w in rng.integers(0, 2**32, 2)]
            if trial < 16:   # every code in byte `byte` of both words
                words = [(w & ~(0xFF << 8 * byte)) | ((trial * 17 + j * 5) & 0xFF) << 8 * byte
                         for j, w in enumerate(words)]
            scales = [_half(_round_half(float(s), bf16), bf16)
                      for s in rng.uniform(-0.05, 0.05, 2)]
            zint = [int(z) for z in rng.integers(0, 16, 2)]
            if mode == "zero":   # a float zero term, as the packing stores -z * s
                zt = [_half(_round_half(-float(z) * s, bf16), bf16)
                      for z, s in zip(rng.uniform(0, 15, 2), scales)]
                zreg = _pack(*zt, bf16)
            elif mode == "integer_zero":   # magic + z, as ops.ws_scales builds it
                magic = 0x4300 if bf16 else 0x6400
                zreg = (magic | zint[0]) | (magic | zint[1]) << 16
            else:
                zreg = 0
            fed = words
            if swapped:
                fed = [int(w) & 0xFFFFFFFF for w in
                       swap_pair_bytes(torch.tensor(words, dtype=torch.int64)
                                       .to(torch.int32)).tolist()]
            out = run_ptx(text, {"$2": fed[0], "$3": fed[1], "$4": _pack(*scales, bf16),
                                 "$5": zreg})
            for plane, reg in ((2 * byte, "$0"), (2 * byte + 1, "$1")):
                got = [out[reg] & 0xFFFF, out[reg] >> 16]
                for j in range(2):
                    u = (words[j] >> (4 * plane)) & 0xF
                    if mode == "zero":
                        want = u * scales[j] + zt[j]
                    elif mode == "integer_zero":
                        want = (u - zint[j]) * scales[j]
                    else:
                        want = (u - 8) * scales[j]
                    assert got[j] == _round_half(want, bf16), (byte, plane, j, u, mode, bf16)


def test_fp16_odd_planes_need_no_shift():
    """fp16 with zero terms or symmetric: the odd plane is read in place (mask 0x00F000F0, one
    FMA by 1/16), one instruction fewer than a shift, mask and subtract; bf16 and integer zero
    points keep the shift."""
    for byte in range(4):
        for zero in (False, True):
            assert "shr.u32" not in _asm(False, zero, byte)
            assert "shr.u32" in _asm(False, zero, byte, odd_shift=True)
            assert "shr.u32" in _asm(True, zero, byte)
        assert "shr.u32" in _asm(False, True, byte, True)


def test_swapped_words_need_no_byte_permute():
    """The tiled layout's byte-swapped pairs: byte b of both words is one byte of one word
    (a move or an 8-bit shift), so the shift gather has no PRMT and the PRMT gather reads one
    word; the row-by-row words' PRMT reads two."""
    for bf16 in (False, True):
        for zero in (False, True):
            for byte in range(4):
                shift = _asm(bf16, zero, byte, swapped=True)
                assert "prmt" not in shift
                assert ("shr.u32 p, $" in shift) == (byte % 2 == 1)
                word = "$2" if byte < 2 else "$3"
                assert f"prmt.b32 p, {word}, {word}," in _asm(bf16, zero, byte, swapped=True,
                                                             shift=False)
                assert "prmt.b32 p, $2, $3," in _asm(bf16, zero, byte)


@pytest.mark.parametrize("partner", [False, True])
@pytest.mark.parametrize("rows", [2, 4])
def test_mma_gather_on_swapped_words_matches_row_words(rows, partner):
    """The small-M MMA asm's byte gather (``ptx._prmt_ptx``): on the tiled layout's swapped
    pairs it must build the very registers the row-by-row words' PRMT builds (``partner``:
    the pair's other word as the second operand, never selected)."""
    from modelopt_lite.kernels.ptx import _prmt_ptx

    rng = np.random.default_rng(1)
    n = 4 * rows
    words = [int(w) for w in rng.integers(0, 2**32, n)]
    swapped = [int(w) & 0xFFFFFFFF for w in
               swap_pair_bytes(torch.tensor(words, dtype=torch.int64).to(torch.int32)).tolist()]
    q = [f"$q{i}" for i in range(n)]
    for b in range(4):
        want = run_ptx("\n".join(_prmt_ptx(b, rows, q)), dict(zip(q, words)))
        text = "\n".join(_prmt_ptx(b, rows, q, swapped=True, partner=partner))
        got = run_ptx(text, dict(zip(q, swapped)))
        if partner:   # both words of every pair named
            assert all(len(set(line.split(", ")[1:3])) == 2 for line in text.splitlines()), text
        regs = [f"p{pr}_{f}" for pr in range(rows // 2) for f in range(4)]
        assert [got[r] for r in regs] == [want[r] for r in regs], b
