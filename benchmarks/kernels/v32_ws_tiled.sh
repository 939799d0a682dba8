#!/bin/bash
# v32 (NOTES.md): the WS kernel reading the words tile by tile (TILED: ws.tiled_words, a chunk's
# [rows, 16] box one contiguous run of rows x 64 bytes instead of rows runs of 64 bytes, 14-57
# KB apart). The WS kernels at M <= 16 sit at 52-55 us on the large shapes whatever the tile,
# split or ring (Humming 47.4-52.0). Prediction: -3 to -8 % at M = 1-16 if the tensor copies'
# narrow boxes are what limits them; ~0 at M >= 256. (1) the WS GPU tests; (2) run 1: shipped
# rows against TILED twins, one process; run 2 each row's winner again; > 3 % in both goes into
# $OUT/$GPU.json; (3) ROWS with all peers.
#   OUT=/tmp/v32 STEPS=12 bash benchmarks/kernels/v32_ws_tiled.sh, then STEPS=3 ROWS="KxN:M ..."
source "$(dirname "$0")/steps.sh" v32 12
[[ $S == *1* ]] && timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "ws" 2>&1 | tail -3
R="WS=true,BM=16,OUT16=true,COAL=true,MAXNREG=80,STAGES=4"
[[ $S == *2* ]] && TAIL=8 adopt v32_small ${T1:-150} ${T2:-80} --ms ${MS:-1,4,16} \
  --shapes ${SHAPES:-8192x28672,28672x8192} -- --shipped-only --budget-s 130 \
  --twin $R,SPLIT_K=1,TILED=false --twin $R,SPLIT_K=1,TILED=true \
  --twin $R,SPLIT_K=4,TILED=false --twin $R,SPLIT_K=4,TILED=true
[[ $S == *2* ]] && TAIL=12 adopt v32_large ${T3:-200} ${T4:-120} --ms ${MS2:-64,256,1024} -- \
  --shipped-only --budget-s 180 --twin TILED=true
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *3* ]] && bench_rows ${ROWS:-8192x28672:16}
exit 0
