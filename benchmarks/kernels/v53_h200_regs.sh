#!/bin/bash
# v53 (NOTES.md, v52's lead): the H200's small-M MMA rows lose 10-25 % when FS raises their
# registers (72 -> 88 / 92 at 4 warps x 2 rows: 7 -> 5 programs per SM), so try the other way:
# registers capped at launch (MAXNREG, now passed to the MMA kernel too). Off the GPU (ptxas,
# sm_90a, `.maxnreg` in the PTX): the 4-warp x 2-row kernel takes 64 registers with 40 / 32
# bytes of spill stores / loads (8 programs per SM), 56 with 16 / 16 (9); the 2-warp x 4-row
# PARTNER kernel 96 with 16 / 16 (10 programs, from 8). Interleaved A/B, 7 rounds, Humming as
# an arm; a twin > 1.5 % faster in 6 of 7 rounds replaces the row in $OUT/h200.json.
#   OUT=/tmp/v53 bash benchmarks/kernels/v53_h200_regs.sh && cp /tmp/v53/h200.json kernels/configs/
set -u
O=${OUT:-/tmp/v53}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
cp kernels/configs/h200.json "$O/h200.json"
for row in ${ROWS:-8192x28672:1 8192x28672:4 28672x8192:1 4096x14336:1 4096x14336:4 14336x4096:1 \
                  14336x4096:4 4096x4096:1}; do
  sh=${row%:*}; m=${row#*:}; echo "== $sh M=$m"
  timeout 100 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --min-wins 6 \
    --margin 0.015 --humming --twin MAXNREG=56 --twin MAXNREG=64 --twin MAXNREG=96 \
    --write-table "$O/h200.json" --out "$O/ab/ab_${sh}_m$m.json" \
    2>&1 | grep -v Warn | tail -6 | cut -c1-110
done
exit 0
