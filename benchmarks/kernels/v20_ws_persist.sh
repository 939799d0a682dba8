#!/bin/bash
# v20 (NOTES.md): the persistent warp-specialized kernel (PERSIST 1: one program per SM walking
# its tiles through one ring) where v19 saw it ahead but under the 3 % bar in one of its two
# runs (8192x28672 / 28672x8192 at M = 1024), and as the default for shapes without a table row
# (tuning.ws_default) at M = 1024 / 4096; then the rows v19 / v20 changed, with all peers, one
# process per row. On an H100 (GPU=h200 on an H200), after v19's table is in kernels/configs:
#   OUT=/tmp/v20 bash benchmarks/kernels/v20_ws_persist.sh && cp /tmp/v20/h100.json kernels/configs/
source "$(dirname "$0")/steps.sh" v20 123
P="WS=true,BM=256,STAGES=3,SPLIT_K=1,PERSIST=1"
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *1* ]] && TAIL=4 adopt v20_persist ${T1:-150} ${T2:-150} \
  --shapes ${SHAPES1:-8192x28672,28672x8192} --ms ${MS1:-1024} -- --shipped-only --twin $P
if [[ $S == *2* ]]; then
# (2) tuning.ws_default (shipped: no table row) against the same with PERSIST 1, twice
for r in 1 2; do
timeout ${T3:-120} python3 $K/sweep_large.py --shapes 4096x11008,11008x4096,5120x13824,8192x8192 \
  --ms 1024,4096 --shipped-only --twin PERSIST=1 --no-peers \
  --out "$O/kernels_v20_default_persist_run${r}_$G.json" 2>&1 | grep -v Warning | tail -9
done
fi
# (3) changed rows with every peer, one process per row (ROWS: KxN:M ...)
[[ $S == *3* ]] && bench_rows ${ROWS:-4096x4096:1024 4096x14336:1024}
exit 0
