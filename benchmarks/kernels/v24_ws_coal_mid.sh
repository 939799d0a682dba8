#!/bin/bash
# v24 (NOTES.md): the full GPU test suite after v22's coalesced epilogue, then warp-specialized
# twins with that epilogue at M = 256 / 1024 (128-token tiles, persistent or split, 256 rows per
# program) on the shapes still short of their targets; run 1 and run 2 as v22, > 3 % twice
# into $OUT/$GPU.json.   OUT=/tmp/v24 bash benchmarks/kernels/v24_ws_coal_mid.sh
source "$(dirname "$0")/steps.sh" v24 12
[[ $S == *1* ]] && timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/ 2>&1 | tail -2
W="WS=true,BM=128,SPLIT_K=1,COAL=true"
[[ $S == *2* ]] && TAIL=7 adopt v24 ${T1:-180} ${T2:-120} \
  --shapes ${SHAPES:-8192x28672,28672x8192,4096x14336} --ms ${MS:-256,1024} -- --shipped-only \
  --budget-s 160 --twin $W,STAGES=4 --twin $W,STAGES=4,PERSIST=1 \
  --twin $W,BN=256,STAGES=3,PERSIST=1 --twin WS=true,BM=128,STAGES=4,SPLIT_K=2,OUT16=true
exit 0
