#!/bin/bash
# v13 on the three 4096-wide shapes (NOTES.md): the PAIRS tiles (and each without PAIRS) at
# M = 64 / 256 / 1024 after the early-return fix (run 1), then the winners against the shipped
# dispatch in a new process (run 2), which writes rows that won twice into $OUT/h100.json.
#   OUT=/tmp/v13 bash benchmarks/kernels/v13_mid.sh
set -u
O=${OUT:-/tmp/v13}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
S=4096x4096,4096x14336,14336x4096
cp kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-300} python3 $K/sweep_large.py --shapes $S --ms 64,256,1024 --no-peers --pair-tiles \
  --twin PAIRS=false --budget-s ${B1:-270} --out "$O/kernels_v13_mid_run1_h100.json" 2>&1 \
  | grep -v Warning | tail -10
timeout ${T2:-120} python3 $K/sweep_large.py --shapes $S --ms 64,256,1024 \
  --from "$O/kernels_v13_mid_run1_h100.json" --write-table "$O/h100.json" \
  --out "$O/kernels_v13_mid_run2_h100.json" 2>&1 | grep -v Warning | tail -10
