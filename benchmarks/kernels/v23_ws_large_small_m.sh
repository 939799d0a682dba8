#!/bin/bash
# v23 (NOTES.md): more warp-specialized twins for the two large shapes at M = 16 / 64 (after
# v22's coalesced epilogue): 256 rows per program with K split 2 / 3, persistence, an 8-deep
# ring, and 16-token tiles of 256 rows; run 1 and run 2 as v22, > 3 % twice into $OUT/$GPU.json.
#   OUT=/tmp/v23 bash benchmarks/kernels/v23_ws_large_small_m.sh
set -u
O=${OUT:-/tmp/v23}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
W="WS=true,BM=64,OUT16=true"
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
SH=${SHAPES:-8192x28672,28672x8192}
timeout ${T1:-200} python3 $K/sweep_large.py --shapes $SH --ms ${MS:-16,64} --shipped-only \
  --budget-s 180 --twin $W,BN=256,STAGES=5,SPLIT_K=2 --twin $W,BN=256,STAGES=5,SPLIT_K=3 \
  --twin $W,STAGES=6,SPLIT_K=1,COAL=true,PERSIST=1 --twin $W,STAGES=8,SPLIT_K=2 \
  --twin WS=true,BM=16,OUT16=true,BN=256,STAGES=8,SPLIT_K=2 \
  --twin WS=true,BM=16,OUT16=true,BN=256,STAGES=8,SPLIT_K=4 \
  --no-peers --out "$O/kernels_v23_run1_$G.json" 2>&1 | grep -v Warning | tail -5
timeout ${T2:-100} python3 $K/sweep_large.py --shapes $SH --ms ${MS:-16,64} \
  --from "$O/kernels_v23_run1_$G.json" --write-table "$O/$G.json" --no-peers \
  --out "$O/kernels_v23_run2_$G.json" 2>&1 | grep -v Warning | tail -5
