#!/bin/bash
# v21 (NOTES.md): the warp-specialized kernel at small M (1, 16, 64), where the fused / mma
# kernels serve now: deeper rings (STAGES 6-10; a 16-token stage is 12.5 KB, so several programs
# share an SM) and K splits so that short grids fill the card; the token tile is clipped to M's
# power of two (>= 16). Run 1 times every row's shipped config against the twins in one
# process; run 2 (a new process) each row's winner again; > 3 % in both goes into $OUT/$GPU.json.
# On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v21 bash benchmarks/kernels/v21_ws_small.sh && cp /tmp/v21/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v21}; mkdir -p "$O"
G=${GPU:-h100}
S=${STEPS:-12}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
W="WS=true,BM=64,OUT16=true"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
if [[ $S == *1* ]]; then
timeout ${T1:-330} python3 $K/sweep_large.py --ms ${MS:-1,16,64} --shipped-only --budget-s 300 \
  --twin $W,STAGES=6,SPLIT_K=1 --twin $W,STAGES=6,SPLIT_K=2 --twin $W,STAGES=6,SPLIT_K=4 \
  --twin $W,STAGES=6,SPLIT_K=8 --twin $W,BN=256,STAGES=5,SPLIT_K=2 \
  --twin $W,BN=256,STAGES=5,SPLIT_K=4 --twin WS=true,BM=16,OUT16=true,STAGES=10,SPLIT_K=4 \
  --no-peers --out "$O/kernels_v21_ws_small_run1_$G.json" 2>&1 | grep -v Warning | tail -17
fi
if [[ $S == *2* ]]; then
timeout ${T2:-200} python3 $K/sweep_large.py --ms ${MS:-1,16,64} \
  --from "$O/kernels_v21_ws_small_run1_$G.json" --write-table "$O/$G.json" --no-peers \
  --out "$O/kernels_v21_ws_small_run2_$G.json" 2>&1 | grep -v Warning | tail -17
fi
