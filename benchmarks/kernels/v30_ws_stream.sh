#!/bin/bash
# v30 (NOTES.md): stream-K for the warp-specialized kernel (STREAM: programs per SM, each an
# equal run of the tiles' K chunks, partial tiles added with COAL's vector atomics). v15's
# stream-K lost on the fused kernel to scalar atomics; COAL's v8.f16 atomics made WS splits win
# (v22, v28). Prediction: 8192x28672 M = 256 runs 224 tiles on 132 SMs (1.7 waves; persistent
# 198.5 us, 1.07x): -8 to -12 %; M = 64 (112 tiles of 256 rows, split 4): -5 %; M = 1024
# (6.8 waves): -2 %. (1) the WS GPU tests; (2) run 1: the shipped rows at M = 16-1024 against
# STREAM twins, one process; run 2 each row's winner again; > 3 % in both into $OUT/$GPU.json;
# (3) ROWS with all peers.
#   OUT=/tmp/v30 STEPS=12 bash benchmarks/kernels/v30_ws_stream.sh, then STEPS=3 ROWS="KxN:M ..."
source "$(dirname "$0")/steps.sh" v30 12
[[ $S == *1* ]] && timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "ws" 2>&1 | tail -3
[[ $S == *2* ]] && TAIL=12 adopt v30 ${T1:-240} ${T2:-150} --ms ${MS:-64,256,1024} -- \
  --shipped-only --budget-s 220 --twin WS=true,BN=128,BM=256,STAGES=3,STREAM=1,OUT16=true \
  --twin WS=true,BN=256,BM=128,STAGES=3,STREAM=1,OUT16=true \
  --twin WS=true,BN=128,BM=64,STAGES=6,STREAM=1,OUT16=true
R="WS=true,BM=16,OUT16=true,COAL=true,MAXNREG=80,STAGES=4"
[[ $S == *2* ]] && TAIL=5 adopt v30_small ${T3:-120} ${T4:-60} --ms ${MS2:-16} \
  --shapes 8192x28672,28672x8192 -- --shipped-only --budget-s 100 \
  --twin $R,STREAM=2 --twin WS=true,BM=16,OUT16=true,STAGES=8,STREAM=1
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *3* ]] && bench_rows ${ROWS:-8192x28672:256}
exit 0
