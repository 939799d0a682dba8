#!/bin/bash
# v12 (NOTES.md): scale and zero term as one 32-bit word per row and block (`PAIRS`) in the
# large-M fused kernel, A/B against the same tile without it, in one call on one card:
#   1. every shape, M = 64 / 256 / 1024: the shipped fused config (BM 256 tile at M = 1024)
#      with and without PAIRS, cuBLAS fp16 and Humming;
#   2. the large shapes, M = 64 / 256: every fused candidate with and without PAIRS.
#   OUT=/tmp/v12 bash benchmarks/kernels/v12_pairs.sh
set -u
O=${OUT:-/tmp/v12}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout 280 python3 $K/sweep_large.py --shipped-only --twin PAIRS=true --budget-s 250 \
  --out "$O/kernels_v12_pairs_ab_h100.json" 2>&1 | grep -v Warning
timeout 250 python3 $K/sweep_large.py --shapes 8192x28672,28672x8192 --ms 64,256 --no-peers \
  --twin PAIRS=true --budget-s 220 --out "$O/kernels_v12_pairs_sweep_h100.json" 2>&1 | grep -v Warning
