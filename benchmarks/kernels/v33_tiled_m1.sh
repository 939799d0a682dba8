#!/bin/bash
# v33 (NOTES.md): around v32's TILED winners at M = 1 / 4 (28672x8192: 16-token tiles, MAXNREG
# 80, split 4, 4 stages; 49.7 / 49.8 us with all peers, Humming 47.9 / 47.8): splits 2 / 8 and
# 6-stage rings, on both large shapes; then ROWS with all peers.
#   OUT=/tmp/v33 bash benchmarks/kernels/v33_tiled_m1.sh
source "$(dirname "$0")/steps.sh" v33 12
R="WS=true,BM=16,OUT16=true,COAL=true,MAXNREG=80,TILED=true"
[[ $S == *1* ]] && TAIL=5 adopt v33 ${T1:-150} ${T2:-80} --ms ${MS:-1,4} \
  --shapes ${SHAPES:-28672x8192,8192x28672} -- --shipped-only --budget-s 130 \
  --twin $R,STAGES=4,SPLIT_K=2 --twin $R,STAGES=4,SPLIT_K=8 --twin $R,STAGES=6,SPLIT_K=4 \
  --twin $R,STAGES=6,SPLIT_K=1
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && bench_rows ${ROWS:-28672x8192:1 8192x28672:16}
exit 0
