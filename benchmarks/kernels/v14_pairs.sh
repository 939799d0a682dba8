#!/bin/bash
# v14 (NOTES.md): the fused kernel's scale/zero-term words transposed (PAIRS 2, [K/B, N]) against
# the shipped tiles, on the large and the 4096-wide shapes, each in one process with cuBLAS and
# Humming. TAG names the run (run1, run2).
#   OUT=/tmp/v14 TAG=run2 bash benchmarks/kernels/v14_pairs.sh
set -u
O=${OUT:-/tmp/v14}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
T=${TAG:-run1}
timeout ${T1:-150} python3 $K/sweep_large.py --shapes 8192x28672,28672x8192 \
  --ms ${MS:-64,256,1024} \
  --shipped-only --twin PAIRS=2 --out "$O/kernels_v14_pairs2_large_${T}_h100.json" 2>&1 \
  | grep -v Warning | tail -7
timeout ${T2:-150} python3 $K/sweep_large.py --shapes 4096x4096,4096x14336,14336x4096 \
  --ms ${MS:-64,256,1024} --shipped-only --twin PAIRS=2 \
  --out "$O/kernels_v14_pairs2_mid_${T}_h100.json" 2>&1 | grep -v Warning | tail -10
