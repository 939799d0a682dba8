#!/bin/bash
# v15 (NOTES.md): stream-K for the fused kernel (`STREAM`). Run 1: the shipped config of every
# M = 64 / 256 row against its STREAM twins (1 program per SM with float32 or fp16 atomics,
# 2 per SM with fp16 atomics), one process; run 2 (a new process): each row's winner against
# the shipped config again. Rows whose winner beat the shipped config by > 3 % in both runs
# go into $OUT/h100.json (a copy of the shipped table). On an H100:
#   OUT=/tmp/v15 bash benchmarks/kernels/v15_stream.sh
set -u
O=${OUT:-/tmp/v15}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-64,256}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
cp kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-280} python3 $K/sweep_large.py --ms $MS --shipped-only --twin STREAM=1 \
  --twin STREAM=1,OUT16=true --twin STREAM=2,OUT16=true --no-peers \
  --out "$O/kernels_v15_stream_run1_h100.json" 2>&1 | grep -v Warning | tail -14
timeout ${T2:-180} python3 $K/sweep_large.py --ms $MS --from "$O/kernels_v15_stream_run1_h100.json" \
  --write-table "$O/h100.json" --no-peers --out "$O/kernels_v15_stream_run2_h100.json" 2>&1 \
  | grep -v Warning | tail -14
