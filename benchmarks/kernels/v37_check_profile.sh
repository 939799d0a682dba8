#!/bin/bash
# v37 (NOTES.md; run 2026-11-27 on an H100): (1) the GPU tests, since the changes made
# after v36 (PDL edge cases, the second-device guard, Int4Linear under torch.compile) have not
# run on a GPU; (2) why 28672x8192 at M = 1-8 trails Humming by 3-4 % in every A/B while our
# TILED tile reads at 86-87 % of the measured read floor: Nsight Compute of ours (the zeroing
# kernel and the WS kernel) and Humming at M = 1 and 4, and the lines worth comparing.
#   OUT=/tmp/v37 bash benchmarks/kernels/v37_check_profile.sh
set -u
O=${OUT:-/tmp/v37}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
timeout ${TT:-300} python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider tests/ 2>&1 \
  | tail -6 | tee "$O/gpu_tests.txt"
OUT=$O SHAPE=28672x8192 MS=${MS:-1,4} PEER=humming TAG=ncu_28672x8192 \
  bash benchmarks/kernels/ncu_profile.sh
grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Memory Throughput|L2 Hit Rate|Achieved Occupancy|Registers Per Thread|Waves Per SM|Grid Size|Dynamic Shared Memory Per Block" \
  "$O/ncu_28672x8192.txt" > "$O/ncu_28672x8192_summary.txt"
exit 0
