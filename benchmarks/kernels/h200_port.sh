#!/bin/bash
# H200 config table (NOTES.md, v12): for every row of the H100 table (five shapes, M = 1, 2, 4,
# 8, 16, 64, 256, 1024) time the H100 config against the shape heuristic (`default_config`,
# what an H200 ran without a table) in one process (run 1), then again in a new process
# (run 2); rows where the H100 config won by > 3 % in both runs go into h200.json, every
# other row stays DEFAULT (the heuristic). Run on an H200:
#   OUT=/tmp/h200 bash benchmarks/kernels/h200_port.sh && cp /tmp/h200/h200.json kernels/configs/
set -u
O=${OUT:-/tmp/h200}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-1,2,4,8,16,64,256,1024}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
rm -f kernels/configs/h200.json "$O/h200.json"     # both runs time the heuristic as "shipped"
timeout ${T1:-280} python3 $K/sweep_large.py --ms $MS --cands-table kernels/configs/h100.json \
  --no-peers --out "$O/kernels_h200_port_run1.json" 2>&1 | grep -v Warning | tail -42
timeout ${T2:-280} python3 $K/sweep_large.py --ms $MS --cands-table kernels/configs/h100.json \
  --from "$O/kernels_h200_port_run1.json" --write-table "$O/h200.json" --no-peers \
  --out "$O/kernels_h200_port_run2.json" 2>&1 | grep -v Warning | tail -42
