#!/bin/bash
# v26 (NOTES.md): 8192x28672 M = 16 on v25's config (MAXNREG 80; the run used the key's first
# name, REGS) with all peers, then ring depth 3 / 5 and 64 registers per thread at M = 1 / 16 on
# the two large shapes (run 1 / run 2 as v22).
#   OUT=/tmp/v26 bash benchmarks/kernels/v26_regs_more.sh
source "$(dirname "$0")/steps.sh" v26 12
[[ $S == *1* ]] && bench_rows 8192x28672:16
W="WS=true,BM=16,OUT16=true,COAL=true"
[[ $S == *2* ]] && TAIL=5 adopt v26 ${T1:-100} ${T2:-60} --shapes 8192x28672,28672x8192 \
  --ms 1,16 -- --shipped-only --budget-s 90 --twin $W,MAXNREG=80,STAGES=3,SPLIT_K=1 \
  --twin $W,MAXNREG=80,STAGES=5,SPLIT_K=1 --twin $W,MAXNREG=64,STAGES=4,SPLIT_K=1 \
  --twin $W,MAXNREG=80,STAGES=3,SPLIT_K=2 --twin $W,MAXNREG=64,STAGES=4,SPLIT_K=2
exit 0
