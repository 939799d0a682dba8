#!/bin/bash
# v50 (NOTES.md): the large shapes' M = 1-8 rows against the 4-warp MMA GEMV at other K splits
# (and 2 warps with PARTNER), Humming as an arm; interleaved A/B, 7 rounds, a twin > 1.5 %
# faster in 6 of 7 rounds replaces the row (ab.py --write-table). Then the other 2-warp MMA
# rows: v50_mma_rows.sh. On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v50s GPU=h100 bash benchmarks/kernels/v50_splits.sh && cp /tmp/v50s/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v50s}; mkdir -p "$O/ab"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
cp "kernels/configs/$G.json" "$O/$G.json"
ab() {
  sh=$1; m=$2; shift 2; echo "== $sh M=$m"
  timeout 90 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --min-wins 6 \
    --margin 0.015 --humming "$@" --write-table "$O/$G.json" --out "$O/ab/ab_${sh}_m$m.json" 2>&1 \
    | grep -v Warn | tail -9 | cut -c1-130
}
M='"MMA":true,"BN":64,"PREFETCH":false,"OUT16":true,"SV":4,"QE":"evict_first"'
for m in 1 2 4 8; do
  ab 8192x28672 "$m" --cfg "{$M,\"num_warps\":4,\"SPLIT_K\":4}" --cfg "{$M,\"num_warps\":4,\"SPLIT_K\":2}" \
    --cfg "{$M,\"num_warps\":4,\"SPLIT_K\":8}" --cfg "{$M,\"num_warps\":2,\"SPLIT_K\":16,\"PARTNER\":true}"
  ab 28672x8192 "$m" --cfg "{$M,\"num_warps\":4,\"SPLIT_K\":7}" --cfg "{$M,\"num_warps\":4,\"SPLIT_K\":14}" \
    --cfg "{$M,\"num_warps\":2,\"SPLIT_K\":28,\"PARTNER\":true}"
done
exit 0
