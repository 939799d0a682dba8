#!/bin/bash
# v15 (NOTES.md), after the barrier between a stream-K program's tiles: (1) check_stream.py,
# every STREAM tile x shape x M = 64 / 256, 8 calls each, against the float32 product; (2) the
# rows whose STREAM winner beat the shipped config twice in v15_stream.sh timed again, twice, in
# new processes (winner vs shipped), the table written to $OUT/h100.json where it still wins by
# > 3 % in both; (3) those shapes with all peers (bench_w4a16.py) on that table. On an H100:
#   OUT=/tmp/v15 bash benchmarks/kernels/v15_confirm.sh
set -u
O=${OUT:-/tmp/v15}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
R=benchmarks/results
SH=${SHAPES:-4096x4096,14336x4096}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout ${T0:-150} python3 $K/check_stream.py --reps 8 2>&1 | grep -v Warning | grep -v ": ok" | tail -30
cp kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-120} python3 $K/sweep_large.py --ms 64,256 --shapes $SH \
  --from $R/kernels_v15_stream_run1_h100.json --no-peers \
  --out "$O/kernels_v15_stream_run3_h100.json" 2>&1 | grep -v Warning | tail -6
timeout ${T2:-120} python3 $K/sweep_large.py --ms 64,256 --shapes $SH \
  --from "$O/kernels_v15_stream_run3_h100.json" --write-table "$O/h100.json" --no-peers \
  --out "$O/kernels_v15_stream_run4_h100.json" 2>&1 | grep -v Warning | tail -6
cp "$O/h100.json" kernels/configs/h100.json
timeout ${T3:-150} python3 $K/bench_w4a16.py --shapes $SH --ms 64,256 \
  --out "$O/kernels_v15_bench_h100.json" 2>&1 | grep -v Warning | tail -6
