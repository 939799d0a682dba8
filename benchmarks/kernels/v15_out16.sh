#!/bin/bash
# v15 (NOTES.md): split-K partials of the fused kernel added straight into the fp16 output
# (`OUT16`, fp16 atomics) instead of a float32 buffer plus a conversion pass. (1) check_splitk.py:
# every fused tile x shape x split x OUT16 at M = 64 / 256, 6 calls each, against the float32
# product; (2) run 1: for every M = 64 / 256 / 1024 row, the shipped config against its twins
# with OUT16, with split 2 + OUT16 and with split 4 + OUT16 (one process); (3) run 2 (a new
# process): each row's winner against the shipped config again; rows that won by > 3 % in both
# runs go into $OUT/$GPU.json (a copy of the shipped table). Then bench the new table with all
# peers (bench_w4a16.py). On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v15 bash benchmarks/kernels/v15_out16.sh && cp /tmp/v15/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v15}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-64,256,1024}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout ${T0:-100} python3 $K/check_splitk.py --reps 6 2>&1 | grep -v Warning | grep -v ": ok"
cp kernels/configs/$G.json "$O/$G.json"
timeout ${T1:-170} python3 $K/sweep_large.py --ms $MS --shipped-only --twin OUT16=true \
  --twin SPLIT_K=2,OUT16=true --twin SPLIT_K=4,OUT16=true --no-peers \
  --out "$O/kernels_v15_out16_all_run1_$G.json" 2>&1 | grep -v Warning | tail -16
timeout ${T2:-120} python3 $K/sweep_large.py --ms $MS --from "$O/kernels_v15_out16_all_run1_$G.json" \
  --write-table "$O/$G.json" --no-peers --out "$O/kernels_v15_out16_all_run2_$G.json" 2>&1 \
  | grep -v Warning | tail -16
