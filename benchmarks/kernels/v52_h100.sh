#!/bin/bash
# v52 on an H100 (NOTES.md, v50 / v51 / v52 leads; not run yet). (1) 8192x28672 M = 1, at ~46 us
# in 1 of 3 processes: twins of the shipped 4-warp MMA GEMV with 4 rows a thread (BN 128,
# PARTNER) at K splits 2 / 4, and XPERM (activations permuted once per call: 1.5-2 % on the
# H200's MMA rows in v52, where FS 1 / 2 lost 10-25 % and were dropped).
# A twin > 1.5 % faster in 6 of 7 rounds replaces the row (ab.py --write-table). (2) The same
# XPERM twin on 28672x8192 M = 1 / 4. (3) The measured M = 1 floor (read_floor.py). Then run the
# whole table in its own call (its floor column now from the faster copy, v51d):
#   OUT=/tmp/v52 bash benchmarks/kernels/v52_h100.sh && cp /tmp/v52/h100.json kernels/configs/
#   python benchmarks/kernels/bench_w4a16.py --out benchmarks/results/kernels_v52_h100.json
set -u
O=${OUT:-/tmp/v52}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
cp kernels/configs/h100.json "$O/h100.json"
ab() {
  sh=$1; m=$2; shift 2; echo "== $sh M=$m"
  timeout 100 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --min-wins 6 \
    --margin 0.015 --humming "$@" --write-table "$O/h100.json" --out "$O/ab/ab_${sh}_m$m.json" \
    2>&1 | grep -v Warn | tail -8 | cut -c1-130
}
ab 8192x28672 1 --twin BN=128,PARTNER=true,SPLIT_K=2 --twin BN=128,PARTNER=true,SPLIT_K=4 \
  --twin XPERM=true --twin BN=128,PARTNER=true,SPLIT_K=4,XPERM=true
for m in 1 4; do ab 28672x8192 "$m" --twin XPERM=true; done
timeout 120 python3 benchmarks/kernels/read_floor.py --shapes 8192x28672,28672x8192 \
  --blocks 2048,8192 --iters 1,4 --warps 4,8 --out "$O/read_floor_h100.json" | tail -2
exit 0
