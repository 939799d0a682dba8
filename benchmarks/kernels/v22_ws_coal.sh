#!/bin/bash
# v22 (NOTES.md): the warp-specialized kernel's coalesced epilogue (COAL: the accumulator
# through shared memory into 8 adjacent rows per thread, 128-bit stores and v8.f16 atomics; on
# by default with a K split). v21's WS splits lost to the atomics' scalar f16 adds. (1) the WS
# GPU tests; (2) run 1: every M = 1 / 16 / 64 row's shipped config against WS twins (split,
# coalesced), one process; run 2 (a new process) each row's winner again; > 3 % in both goes
# into $OUT/$GPU.json; (3) M = 256 the same with 128-token tiles and COAL stores.
#   OUT=/tmp/v22 bash benchmarks/kernels/v22_ws_coal.sh && cp /tmp/v22/h100.json kernels/configs/
source "$(dirname "$0")/steps.sh" v22 123
W="WS=true,BM=64,OUT16=true"
[[ $S == *1* ]] && timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "ws" 2>&1 | tail -3
[[ $S == *2* ]] && adopt v22_ws_small ${T1:-200} ${T2:-120} --ms ${MS:-1,16,64} -- \
  --shipped-only --budget-s 180 \
  --twin $W,STAGES=6,SPLIT_K=2 --twin $W,STAGES=6,SPLIT_K=4 --twin $W,STAGES=6,SPLIT_K=8 \
  --twin $W,BN=256,STAGES=5,SPLIT_K=4 --twin WS=true,BM=16,OUT16=true,STAGES=10,SPLIT_K=4 \
  --twin WS=true,BM=16,OUT16=true,STAGES=10,SPLIT_K=8 --twin $W,STAGES=6,SPLIT_K=1,COAL=true
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *3* ]] && TAIL=7 adopt v22_ws_256 ${T3:-150} ${T4:-100} --ms 256 -- --shipped-only \
  --budget-s 130 --twin WS=true,BM=128,STAGES=4,SPLIT_K=1,COAL=true \
  --twin WS=true,BM=128,STAGES=4,SPLIT_K=2,OUT16=true \
  --twin WS=true,BN=256,BM=128,STAGES=3,SPLIT_K=1,COAL=true
exit 0
