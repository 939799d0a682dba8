#!/bin/bash
# v35 (NOTES.md; step 1 run on 2026-11-27, outcome there): M = 1 / 2 / 4 on 8192x28672,
# where the mma kernel (51.2-53.8 us) trails Humming (50.4-51.5). v34's alternating bench
# processes read the WS TILED config (16-token tiles, MAXNREG 80, no split) 1.5-3.5 % faster;
# its 224 row tiles fill 85 % of the 264 two-per-SM slots, so stream-K over two programs per SM
# (STREAM=2) should even that out. Twins: TILED with no split, with STREAM 2, with STREAM 2 and 6 stages; two runs, then
# ROWS with all peers (TILED copies allowed, as in the README table). Also M = 64, below.
#   OUT=/tmp/v35 bash benchmarks/kernels/v35_tiled_stream_m1.sh
source "$(dirname "$0")/steps.sh" v35 12
R="WS=true,BN=128,BM=16,OUT16=true,COAL=true,MAXNREG=80,TILED=true,SPLIT_K=1"
[[ $S == *1* ]] && TAIL=5 adopt v35 ${T1:-120} ${T2:-60} --ms ${MS:-1,2,4} \
  --shapes ${SHAPES:-8192x28672} -- --shipped-only --budget-s 100 \
  --twin $R,STAGES=4 --twin $R,STAGES=4,STREAM=2 --twin $R,STAGES=6,STREAM=2
# M = 64 (8192x28672 2.34x, target 2.5x): the shipped 256-row, 6-stage tile leaves 20 of 132
# SMs idle (112 tiles); v30's stream-K twin had 3 stages. Stream-K on the 6-stage ring, ± TILED.
S6="WS=true,BN=256,BM=64,OUT16=true,STAGES=6,STREAM=1"
[[ $S == *1* ]] && TAIL=3 adopt v35_m64 ${T3:-90} ${T4:-50} --ms 64 \
  --shapes 8192x28672,28672x8192 -- --shipped-only --budget-s 80 --twin $S6 --twin $S6,TILED=true
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && bench_rows ${ROWS:-8192x28672:1 8192x28672:4 8192x28672:64}
exit 0
