#!/bin/bash
# v19 (NOTES.md; prepared, not yet run): the warp-specialized kernel (`WS`) with a K split
# (SPLIT_K > 1: K slices added with atomics, fp16 straight into the output with OUT16) for the
# short grids where v18's WS lost (M = 64 / 256 on the 4096- and 8192-row shapes), and
# persistent (PERSIST: programs walk several tiles through one ring) at M = 256 / 1024.
# (1) the WS GPU tests (split 3 and 5, persistent among them); (2) split: run 1, every M = 64 /
# 256 row's shipped config against WS twins with BM 128 or 64 and split 2 / 4, one process;
# run 2 (a new process), each row's winner again; > 3 % in both runs goes into $OUT/$GPU.json;
# (3) the same for PERSIST 1 / 2 and for 256 rows per program (BN 256, BM 128) at M = 256 /
# 1024, on top of (2)'s table; (4) the WS default
# (tuning.ws_default) on shapes outside the tables against dequantize + cuBLAS. On an H100 (GPU=h200
# on an H200):
#   OUT=/tmp/v19 bash benchmarks/kernels/v19_ws_split.sh && cp /tmp/v19/h100.json kernels/configs/
source "$(dirname "$0")/steps.sh" v19 1234   # STEPS: which of (1)-(4), e.g. 12 then 34
[[ $S == *1* ]] && timeout ${T0:-200} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "ws" 2>&1 | tail -3
W="WS=true,STAGES=4,OUT16=true"
[[ $S == *2* ]] && TAIL=12 adopt v19_ws_split ${T1:-250} ${T2:-150} --ms ${MS:-64,256} -- \
  --shipped-only --twin $W,BM=128,SPLIT_K=2 --twin $W,BM=128,SPLIT_K=4 \
  --twin $W,BM=64,SPLIT_K=2 --twin $W,BM=64,SPLIT_K=4
if [[ $S == *3* ]]; then
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"   # (3) starts from (2)'s table
TAIL=12 adopt v19_ws_persist ${T3:-250} ${T4:-150} --ms ${MS3:-256,1024} -- --shipped-only \
  --twin WS=true,BM=256,STAGES=3,SPLIT_K=1,PERSIST=1 \
  --twin WS=true,BM=128,STAGES=4,SPLIT_K=1,PERSIST=2 \
  --twin WS=true,BN=256,BM=128,STAGES=4,SPLIT_K=1
unset MODELOPT_LITE_KERNEL_CONFIGS
fi
if [[ $S == *4* ]]; then
# (4) shapes outside the tables, where pick_config now gives WS at M >= 512 on Hopper
# (tuning.ws_default): that default against dequantize + cuBLAS (the heuristic before) and the
# fused 256 x 128 tile, one process
timeout ${T5:-200} python3 $K/sweep_large.py --shapes 4096x11008,11008x4096,5120x13824,8192x8192 \
  --ms 512,1024,4096 --budget-s 180 --no-peers --out "$O/kernels_v19_ws_default_$G.json" \
  --cands '[{"DEQUANT": true, "DQ_BN": 32, "DQ_CHUNKS": 4, "DQ_WARPS": 4}, {"BM": 256, "BN": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3, "FUSE_K": true, "GROUP_N": 8, "PAIRS": true}]' \
  2>&1 | grep -v Warning | tail -14
fi
exit 0
