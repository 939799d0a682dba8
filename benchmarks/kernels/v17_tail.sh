#!/bin/bash
# v17 (NOTES.md): split only the last, partial wave (`TAIL`). A fused tile grid that is not a
# whole number of waves leaves SMs idle in its last wave (28672x8192: 224 tiles of 256 x 128 at
# M = 256 are 1.7 waves of 132 SMs; 448 at M = 1024 are 3.4). With TAIL the full waves run
# whole tiles and only the remaining tiles are split SPLIT_K ways (fp16 atomics with OUT16).
# (1) check_splitk.py with TAIL at M = 256 / 1024 (GPU correctness, races); (2) run 1: every
# M = 256 / 1024 row's shipped config against its twins with TAIL and split 2 / 3 / 4 (one
# process); (3) run 2 (a new process): each row's winner against the shipped config again;
# rows that won by > 3 % in both runs go into $OUT/$GPU.json (a copy of the shipped table).
# On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v17 bash benchmarks/kernels/v17_tail.sh && cp /tmp/v17/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v17}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-256,1024}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout ${T0:-120} python3 $K/check_splitk.py --tail --ms $MS --splits 2,3,4 --reps 3 2>&1 \
  | grep -v Warning | grep -v ": ok"
cp kernels/configs/$G.json "$O/$G.json"
timeout ${T1:-200} python3 $K/sweep_large.py --ms $MS --shipped-only \
  --twin TAIL=true,SPLIT_K=2,OUT16=true --twin TAIL=true,SPLIT_K=3,OUT16=true \
  --twin TAIL=true,SPLIT_K=4,OUT16=true --no-peers \
  --out "$O/kernels_v17_tail_run1_$G.json" 2>&1 | grep -v Warning | tail -12
timeout ${T2:-120} python3 $K/sweep_large.py --ms $MS --from "$O/kernels_v17_tail_run1_$G.json" \
  --write-table "$O/$G.json" --no-peers --out "$O/kernels_v17_tail_run2_$G.json" 2>&1 \
  | grep -v Warning | tail -12
