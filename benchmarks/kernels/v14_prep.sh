#!/bin/bash
# v14 (NOTES.md): the MMA path's XPERM activations permuted and the split-K buffer zeroed by one
# Triton kernel (PREP, shipped) against torch's pad / permute copy and fill (PREP=false), the
# shipped configs of the XPERM rows in one process; then the full bench of the rows whose
# config changed (with all peers) for results/kernels_h100.json.
#   OUT=/tmp/v14 bash benchmarks/kernels/v14_prep.sh
set -u
O=${OUT:-/tmp/v14}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
timeout ${T1:-200} python3 $K/sweep_large.py \
  --shapes 4096x4096,4096x14336,14336x4096,8192x28672,28672x8192 \
  --ms ${MS:-9,16} --shipped-only --twin PREP=false --out "$O/kernels_v14_prep_ab_h100.json" 2>&1 \
  | grep -v Warning | tail -11
timeout ${T2:-200} python3 $K/bench_w4a16.py --ms 16,64 --out "$O/kernels_v14_bench_h100.json" \
  2>&1 \
  | grep -v Warning | tail -11
