"""The warp-specialized kernel's ceiling without its dequantization (NOTES.md, v46): ``ab.py``
with the WS kernel's dequantization asm replaced by two register moves, so that the packed
words go to the tensor cores as they are (the products are wrong; the copies, the barriers and
the wgmma are the shipped ones). Compare with a plain ``ab.py`` run of the same shape and M
(separate processes; the error check is skipped here).

    python benchmarks/kernels/ceiling.py --shape 28672x8192 --m 64 --rounds 5
    python benchmarks/kernels/ab.py --shape 28672x8192 --m 64 --rounds 5
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

MOVES = "mov.b32 $0, $2; mov.b32 $1, $3;"   # the two output registers := the two words


def main() -> None:
    from triton.experimental.gluon import language as gl

    from modelopt_lite.kernels import ws

    import peers

    ws._dequant_asm = lambda *args, **kwargs: tuple(gl.constexpr(MOVES) for _ in range(4))
    peers.check = lambda out, ref: 0.0   # ab's error check: the products are not the product
    sys.argv = ["ab.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("ab.py")), run_name="__main__")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
