#!/bin/bash
# v12 small M (NOTES.md): PAIRS in the MMA path (SV chunks' scales and zterms in one load), A/B
# against the shipped configs at M = 1..16 on the five shapes (run 1), then the winners against
# the shipped dispatch again in a new process (run 2, adopts > 3 % wins into a table copy).
#   OUT=/tmp/v12 bash benchmarks/kernels/v12_small.sh
set -u
O=${OUT:-/tmp/v12}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-1,2,4,8,16}
cp kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-330} python3 $K/sweep_large.py --ms $MS --shipped-only --twin PAIRS=true --no-peers \
  --budget-s 300 --out "$O/kernels_v12_small_run1_h100.json" 2>&1 | grep -v Warning | tail -27
timeout ${T2:-240} python3 $K/sweep_large.py --ms $MS --from "$O/kernels_v12_small_run1_h100.json" \
  --write-table "$O/h100.json" --out "$O/kernels_v12_small_run2_h100.json" 2>&1 \
  | grep -v Warning | tail -27
