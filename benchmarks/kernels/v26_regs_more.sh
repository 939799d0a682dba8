#!/bin/bash
# v26 (NOTES.md): 8192x28672 M = 16 on v25's config (REGS 80) with all peers, then ring depth
# 3 / 5 and 64 registers per thread at M = 1 / 16 on the two large shapes (run 1 / run 2 as v22).
#   OUT=/tmp/v26 bash benchmarks/kernels/v26_regs_more.sh
set -u
O=${OUT:-/tmp/v26}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
timeout 120 python3 $K/bench_w4a16.py --shapes 8192x28672 --ms 16 \
  --out "$O/bench_8192x28672_m16_$G.json" 2>&1 | grep -v Warning | tail -2
W="WS=true,BM=16,OUT16=true,COAL=true"
timeout ${T1:-100} python3 $K/sweep_large.py --shapes 8192x28672,28672x8192 --ms 1,16 \
  --shipped-only --budget-s 90 --twin $W,REGS=80,STAGES=3,SPLIT_K=1 \
  --twin $W,REGS=80,STAGES=5,SPLIT_K=1 --twin $W,REGS=64,STAGES=4,SPLIT_K=1 \
  --twin $W,REGS=80,STAGES=3,SPLIT_K=2 --twin $W,REGS=64,STAGES=4,SPLIT_K=2 \
  --no-peers --out "$O/kernels_v26_run1_$G.json" 2>&1 | grep -v Warning | tail -5
timeout ${T2:-60} python3 $K/sweep_large.py --shapes 8192x28672,28672x8192 --ms 1,16 \
  --from "$O/kernels_v26_run1_$G.json" --write-table "$O/$G.json" --no-peers \
  --out "$O/kernels_v26_run2_$G.json" 2>&1 | grep -v Warning | tail -5
