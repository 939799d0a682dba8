#!/bin/bash
# v34 (NOTES.md): M = 64 on the large shapes with two programs per SM: 128-row, 64-token tiles
# at MAXNREG 80 (8192x28672: 224 tiles in 264 slots, where the shipped 256-row tile runs 112
# tiles on 132 SMs), plain, TILED, and as stream-K over two programs per SM; then ROWS with all
# peers.   OUT=/tmp/v34 bash benchmarks/kernels/v34_m64_regs.sh
source "$(dirname "$0")/steps.sh" v34 12
R="WS=true,BN=128,BM=64,OUT16=true,COAL=true,MAXNREG=80,STAGES=4,SPLIT_K=1"
[[ $S == *1* ]] && TAIL=3 adopt v34 ${T1:-120} ${T2:-60} --ms ${MS:-64} \
  --shapes ${SHAPES:-8192x28672,28672x8192} -- --shipped-only --budget-s 100 \
  --twin $R --twin $R,TILED=true --twin $R,STREAM=2 --twin $R,STREAM=2,TILED=true
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && bench_rows ${ROWS:-8192x28672:64}
exit 0
