#!/bin/bash
# v12 on the three 4096-wide shapes (NOTES.md): run 1, the PAIRS tiles of sweep_large.py
# --pair-tiles, each also without PAIRS, at M = 64 / 256 / 1024, shipped dispatch timed before
# and after. Run 2 (the second command, in a new process) writes the rows that won twice.
#   OUT=/tmp/v12 bash benchmarks/kernels/v12_mid.sh
#   python3 benchmarks/kernels/sweep_large.py --shapes 4096x4096,4096x14336,14336x4096 \
#     --from $OUT/kernels_v12_mid_tiles_run1_h100.json --write-table kernels/configs/h100.json
set -u
O=${OUT:-/tmp/v12}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
timeout ${T1:-560} python3 benchmarks/kernels/sweep_large.py \
  --shapes 4096x4096,4096x14336,14336x4096 --ms 64,256,1024 --no-peers --pair-tiles \
  --twin PAIRS=false --budget-s ${B1:-520} --out "$O/kernels_v12_mid_tiles_run1_h100.json" 2>&1 \
  | grep -v Warning | tail -10
