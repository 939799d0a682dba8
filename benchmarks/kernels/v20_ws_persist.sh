#!/bin/bash
# v20 (NOTES.md): the persistent warp-specialized kernel (PERSIST 1: one program per SM walking
# its tiles through one ring) where v19 saw it ahead but under the 3 % bar in one of its two
# runs (8192x28672 / 28672x8192 at M = 1024), and as the default for shapes without a table row
# (tuning.ws_default) at M = 1024 / 4096; then the rows v19 / v20 changed, with all peers, one
# process per row. On an H100 (GPU=h200 on an H200), after v19's table is in kernels/configs:
#   OUT=/tmp/v20 bash benchmarks/kernels/v20_ws_persist.sh && cp /tmp/v20/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v20}; mkdir -p "$O"
G=${GPU:-h100}
S=${STEPS:-123}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
P="WS=true,BM=256,STAGES=3,SPLIT_K=1,PERSIST=1"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
if [[ $S == *1* ]]; then
timeout ${T1:-150} python3 $K/sweep_large.py --shapes ${SHAPES1:-8192x28672,28672x8192} \
  --ms ${MS1:-1024} --shipped-only --twin $P --no-peers \
  --out "$O/kernels_v20_persist_run1_$G.json" 2>&1 | grep -v Warning | tail -4
timeout ${T2:-150} python3 $K/sweep_large.py --shapes ${SHAPES1:-8192x28672,28672x8192} \
  --ms ${MS1:-1024} --from "$O/kernels_v20_persist_run1_$G.json" --write-table "$O/$G.json" \
  --no-peers --out "$O/kernels_v20_persist_run2_$G.json" 2>&1 | grep -v Warning | tail -4
fi
if [[ $S == *2* ]]; then
# (2) tuning.ws_default (shipped: no table row) against the same with PERSIST 1, twice
for r in 1 2; do
timeout ${T3:-120} python3 $K/sweep_large.py --shapes 4096x11008,11008x4096,5120x13824,8192x8192 \
  --ms 1024,4096 --shipped-only --twin PERSIST=1 --no-peers \
  --out "$O/kernels_v20_default_persist_run${r}_$G.json" 2>&1 | grep -v Warning | tail -9
done
fi
if [[ $S == *3* ]]; then
# (3) changed rows with every peer, one process per row (ROWS: KxN:M ...)
for row in ${ROWS:-4096x4096:1024 4096x14336:1024}; do
  timeout ${T4:-150} python3 $K/bench_w4a16.py --shapes ${row%%:*} --ms ${row##*:} \
    --out "$O/bench_${row/:/_m}_$G.json" 2>&1 | grep -v Warning | tail -3
done
fi
