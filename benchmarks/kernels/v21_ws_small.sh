#!/bin/bash
# v21 (NOTES.md): the warp-specialized kernel at small M (1, 16, 64), where the fused / mma
# kernels serve now: deeper rings (STAGES 6-10; a 16-token stage is 12.5 KB, so several programs
# share an SM) and K splits so that short grids fill the card; the token tile is clipped to M's
# power of two (>= 16). Run 1 times every row's shipped config against the twins in one
# process; run 2 (a new process) each row's winner again; > 3 % in both goes into $OUT/$GPU.json.
# On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v21 bash benchmarks/kernels/v21_ws_small.sh && cp /tmp/v21/h100.json kernels/configs/
source "$(dirname "$0")/steps.sh" v21 12
W="WS=true,BM=64,OUT16=true"
adopt v21_ws_small ${T1:-330} ${T2:-200} --ms ${MS:-1,16,64} -- --shipped-only --budget-s 300 \
  --twin $W,STAGES=6,SPLIT_K=1 --twin $W,STAGES=6,SPLIT_K=2 --twin $W,STAGES=6,SPLIT_K=4 \
  --twin $W,STAGES=6,SPLIT_K=8 --twin $W,BN=256,STAGES=5,SPLIT_K=2 \
  --twin $W,BN=256,STAGES=5,SPLIT_K=4 --twin WS=true,BM=16,OUT16=true,STAGES=10,SPLIT_K=4
exit 0
