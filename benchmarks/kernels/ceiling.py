"""Timing-only variants of the warp-specialized kernel's dequantization (NOTES.md, v46 and v48):
``ab.py`` with the WS asm replaced, so the products are wrong but the copies, barriers and wgmma
are the shipped ones. ``--variant`` (first argument):

- ``moves``: two register moves (the packed words go to the tensor cores as they are): the
  structure's ceiling without the dequantization (v46);
- ``noprmt``: each byte's PRMT replaced by what a PRMT-free nibble order would need (a shift for
  odd bytes, nothing for even ones; bytes 0-1 from the first word, 2-3 from the second) (v48;
  since v49 what the tiled layout's byte-swapped word pairs run, so it now times the same
  instructions as the shipped kernel on tiled words);
- ``half``: as ``noprmt`` but every byte from the first word, so the compiler loads half the
  word bytes from shared memory (v48: what the words' shared-memory loads cost);
- ``prmt``: the byte permute of the row-by-row words on every layout: the instructions the
  kernel ran on tiled words before their pairs were byte-swapped (v49), against a plain
  ``ab.py`` run for the change's cost or gain.

Compare with a plain ``ab.py`` run of the same shape and M (separate processes; the error check
is skipped here).

    python benchmarks/kernels/ceiling.py moves --shape 28672x8192 --m 64 --rounds 5
    python benchmarks/kernels/ab.py --shape 28672x8192 --m 64 --rounds 5
"""
from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

MOVES = "mov.b32 $0, $2; mov.b32 $1, $3;"   # the two output registers := the two words
VARIANTS = ("moves", "noprmt", "half", "prmt")


def variant_asm(name: str, bf16: bool, zero: bool, zero_offset: bool = False,
                odd_shift: bool = False, swapped: bool = False) -> tuple[str, ...]:
    """The four byte asm strings of a variant (as ``dequant._asm`` gives for the shipped one;
    built from the row-by-row words' asm whatever ``swapped`` says: the products are wrong
    anyway)."""
    from modelopt_lite.kernels.dequant import _asm

    if name == "moves":
        return (MOVES,) * 4
    if name == "prmt":
        return tuple(_asm(bf16, zero, b, zero_offset, odd_shift) for b in range(4))
    out = []
    for b in range(4):
        word = "$2" if name == "half" or b < 2 else "$3"
        src = f"shr.b32 p, {word}, 8;" if b % 2 else f"mov.b32 p, {word};"
        out.append(re.sub(r"prmt\.b32 p, \$2, \$3, 0x[0-9a-f]+;", src,
                          _asm(bf16, zero, b, zero_offset, odd_shift)))
    return tuple(out)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        raise SystemExit(f"usage: ceiling.py {{{','.join(VARIANTS)}}} [ab.py arguments]")
    name = sys.argv[1]
    from triton.experimental.gluon import language as gl

    from modelopt_lite.kernels import ws

    import peers

    ws._dequant_asm = lambda *args: tuple(gl.constexpr(a) for a in variant_asm(name, *args))
    peers.check = lambda out, ref: 0.0   # ab's error check: the products are not the product
    sys.argv = ["ab.py", *sys.argv[2:]]
    runpy.run_path(str(Path(__file__).with_name("ab.py")), run_name="__main__")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
