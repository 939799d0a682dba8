"""Registers and SASS instruction counts of the small-M MMA kernel (kernels/mma.py) compiled
for sm_90a off the GPU, one line per case, to compare layouts and configs without a device:

    python benchmarks/kernels/mma_regs.py --cases '[[256,4,2,4,1,0],[256,4,2,4,0,0]]'

A case is [tile rows (0: row by row), rows per thread, num_warps, SV, swapped pairs, XPERM,
token tiles (optional, 1; 2 for M = 9-16), PARTNER (optional, 0)]; fp16 activations, block
128, zero points, split-K atomics. Registers per thread set how many programs fit on an SM
(65,536 registers, allocated per warp in steps of 256), which the memory-bound M = 1-16 rows
are sensitive to (NOTES.md, v49b-v49e)."""
import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from modelopt_lite.kernels.mma import w4a16_mma_kernel
from modelopt_lite.kernels.ops import _mma_asm
from modelopt_lite.kernels.ptx import mma_constraints

OPS = ("LDG", "PRMT", "HMMA", "LOP3", "HFMA2", "SHF", "IMAD")


def compile_case(work: str, i: int, tr: int, rows: int, warps: int, sv: int, swapped: bool,
                 xperm: bool, n_tiles: int = 1, partner: bool = False) -> dict:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sig = {"x_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
           "bias_ptr": "*fp16", "out_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_om": "i32", "n_groups": "i32", "SPLIT_K": "i32"}
    const = dict(GROUP=128, BN=8 * rows * warps, HAS_ZERO=True, HAS_BIAS=False, EVEN_K=True,
                 ATOMIC=True, USE_ASM=True, IS_BF16=False, PREFETCH=False,
                 ASM=_mma_asm(False, True, 128, n_tiles, True, rows, xperm, swapped, partner),
                 CONSTRAINTS=mma_constraints(rows), DOT_F32=False, ROWS=rows,
                 XTB=8 * n_tiles if xperm else 0, PIPE=None, FS=0, QC="", QE="evict_first", SV=sv,
                 PAIRS=False, PDL=False, TR=tr)
    params = list(inspect.signature(w4a16_mma_kernel.fn).parameters)
    sig.update({k: "constexpr" for k in const})
    src = ASTSource(w4a16_mma_kernel, sig,
                    constexprs={(params.index(k),): v for k, v in const.items()},
                    attrs={(j,): [["tt.divisibility", 16]] for j in (0, 1, 2, 3, 4, 5, 8, 9, 10)})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ptx, cubin = f"{work}/c{i}.ptx", f"{work}/c{i}.cubin"
    with open(ptx, "w") as f:
        f.write(k.asm["ptx"])
    rep = subprocess.run([f"{bindir}/ptxas", "-arch=sm_90a", "-v", ptx, "-o", cubin],
                         capture_output=True, text=True)
    sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", cubin],
                          capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    count = Counter(o.split(".")[0] for o in ops)
    regs = int(re.search(r"Used (\d+) registers", rep.stdout + rep.stderr).group(1))
    per_warp = -(-regs * 32 // 256) * 256
    return dict(case=[tr, rows, warps, sv, int(swapped), int(xperm), n_tiles, int(partner)],
                regs=regs,
                programs_per_sm=min(32, 65536 // per_warp // warps), sass=len(ops),
                ops={o: count[o] for o in OPS})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="[[256,4,2,4,0,0],[256,4,2,4,1,0],[256,2,4,4,1,0],"
                                       "[256,4,2,2,0,1],[256,4,2,2,1,1],[256,2,4,2,1,1]]")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as work:
        for i, case in enumerate(json.loads(args.cases)):
            tr, rows, warps, sv, sw, xp = case[:6]
            n_tiles = case[6] if len(case) > 6 else 1
            partner = len(case) > 7 and bool(case[7])
            print(json.dumps(compile_case(work, i, tr, rows, warps, sv, bool(sw), bool(xp),
                                          n_tiles, partner)))


if __name__ == "__main__":
    main()
