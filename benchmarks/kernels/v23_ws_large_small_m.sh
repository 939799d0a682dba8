#!/bin/bash
# v23 (NOTES.md): more warp-specialized twins for the two large shapes at M = 16 / 64 (after
# v22's coalesced epilogue): 256 rows per program with K split 2 / 3, persistence, an 8-deep
# ring, and 16-token tiles of 256 rows; run 1 and run 2 as v22, > 3 % twice into $OUT/$GPU.json.
#   OUT=/tmp/v23 bash benchmarks/kernels/v23_ws_large_small_m.sh
source "$(dirname "$0")/steps.sh" v23 1
W="WS=true,BM=64,OUT16=true"
TAIL=5 adopt v23 ${T1:-200} ${T2:-100} --shapes ${SHAPES:-8192x28672,28672x8192} \
  --ms ${MS:-16,64} -- --shipped-only --budget-s 180 \
  --twin $W,BN=256,STAGES=5,SPLIT_K=2 --twin $W,BN=256,STAGES=5,SPLIT_K=3 \
  --twin $W,STAGES=6,SPLIT_K=1,COAL=true,PERSIST=1 --twin $W,STAGES=8,SPLIT_K=2 \
  --twin WS=true,BM=16,OUT16=true,BN=256,STAGES=8,SPLIT_K=2 \
  --twin WS=true,BM=16,OUT16=true,BN=256,STAGES=8,SPLIT_K=4
exit 0
