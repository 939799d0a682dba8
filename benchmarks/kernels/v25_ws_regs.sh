#!/bin/bash
# v25 (NOTES.md): the warp-specialized kernel at 80 registers per thread (MAXNREG 80; the run
# used the key's first name, REGS): 384 x 80 leave room for two programs per SM; at 168, the
# default, one program holds the whole register file. For M = 1 / 16 / 64, where one program
# per SM left v21-v23's WS short of the mma and fused kernels. (1) the new GPU test cases;
# (2) run 1 / run 2 as v22, > 3 % twice into $OUT/$GPU.json.
#   OUT=/tmp/v25 bash benchmarks/kernels/v25_ws_regs.sh
source "$(dirname "$0")/steps.sh" v25 12
[[ $S == *1* ]] && timeout ${T0:-90} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "test_gpu_ws_kernel and (cfg11 or cfg12)" \
  2>&1 | tail -2
W="WS=true,MAXNREG=80,OUT16=true"
[[ $S == *2* ]] && adopt v25 ${T1:-170} ${T2:-100} --ms ${MS:-1,16,64} -- --shipped-only \
  --budget-s 150 --twin $W,BM=16,STAGES=6,SPLIT_K=1,COAL=true --twin $W,BM=16,STAGES=6,SPLIT_K=2 \
  --twin $W,BM=16,STAGES=6,SPLIT_K=4 --twin $W,BM=64,STAGES=4,SPLIT_K=1,COAL=true \
  --twin $W,BM=64,STAGES=4,SPLIT_K=2
exit 0
