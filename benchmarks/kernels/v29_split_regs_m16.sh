#!/bin/bash
# v29 (NOTES.md): v27's winner on 28672x8192 M = 8 (MAXNREG 80, 16-token tiles, split 4 with
# COAL: 57.6 -> 53.0 us) at M = 16 on both large shapes (splits 2 / 4 / 8); and for 8192x28672
# M = 256, after v28's persistent COAL tile (198.5 us, 1.07x), the tile order (GROUP_N 4 / 16)
# and 256-row persistent COAL tiles. Then ROWS with all peers.
#   OUT=/tmp/v29 bash benchmarks/kernels/v29_split_regs_m16.sh
source "$(dirname "$0")/steps.sh" v29 12
W="WS=true,BM=16,OUT16=true,COAL=true,MAXNREG=80,STAGES=4"
[[ $S == *1* ]] && TAIL=4 adopt v29_m16 ${T1:-120} ${T2:-60} --ms 16 \
  --shapes 28672x8192,8192x28672 -- --shipped-only --budget-s 100 \
  --twin $W,SPLIT_K=2 --twin $W,SPLIT_K=4 --twin $W,SPLIT_K=8
[[ $S == *1* ]] && TAIL=3 adopt v29_m256 ${T3:-120} ${T4:-60} --ms 256 --shapes 8192x28672 -- \
  --shipped-only --budget-s 100 --twin GROUP_N=4 --twin GROUP_N=16 \
  --twin WS=true,BN=256,BM=128,STAGES=3,PERSIST=1,COAL=true
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && bench_rows ${ROWS:-8192x28672:64}
exit 0
