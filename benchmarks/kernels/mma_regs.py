"""Registers and SASS instruction counts of the small-M MMA kernel (kernels/mma.py) compiled
for sm_90a off the GPU, one line per case, to compare layouts and configs without a device:

    python benchmarks/kernels/mma_regs.py --cases '[[256,4,2,4,1,0],[256,4,2,4,0,0]]'

A case is [tile rows (0: row by row), rows per thread, num_warps, SV, swapped pairs, XPERM,
token tiles (optional, 1; 2 for M = 9-16), PARTNER (optional, 0)]; fp16 activations, block
128, zero points, split-K atomics. Registers per thread set how many programs fit on an SM
(65,536 registers, allocated per warp in steps of 256), which the memory-bound M = 1-16 rows
are sensitive to (NOTES.md, v49b-v49e)."""
import argparse
import json
import os
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="[[256,4,2,4,0,0],[256,4,2,4,1,0],[256,2,4,4,1,0],"
                                       "[256,4,2,2,0,1],[256,4,2,2,1,1],[256,2,4,2,1,1]]")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)   # before the kernels are imported: the real JIT
    from modelopt_lite.kernels.codegen import mma_report

    with tempfile.TemporaryDirectory() as work:
        for i, case in enumerate(json.loads(args.cases)):
            tr, rows, warps, sv, sw, xp = case[:6]
            n_tiles = case[6] if len(case) > 6 else 1
            partner = len(case) > 7 and bool(case[7])
            rep = mma_report(work, f"c{i}", tr=tr, rows=rows, warps=warps, sv=sv,
                             swapped=bool(sw), xperm=bool(xp), n_tiles=n_tiles,
                             partner=partner, sass=True)
            print(json.dumps(dict(case=[tr, rows, warps, sv, int(sw), int(xp), n_tiles,
                                        int(partner)],
                                  **{k: rep.get(k) for k in ("regs", "programs_per_sm",
                                                             "sass", "ops")})))


if __name__ == "__main__":
    main()
