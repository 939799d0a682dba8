#!/bin/bash
# v12 tuning (NOTES.md): the large-M fused candidates with and without PAIRS, run 1 (sweep) and
# run 2 (the run-1 winners against the shipped dispatch again, in a new process); rows whose
# winner beats both shipped timings by > 3 % in run 2 go into a copy of the config table.
#   OUT=/tmp/v12 SHAPES=8192x28672,28672x8192 bash benchmarks/kernels/v12_tune.sh
set -u
O=${OUT:-/tmp/v12}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
S=${SHAPES:-8192x28672,28672x8192}; TAG=${TAG:-large}
cp -n kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-400} python3 $K/sweep_large.py --shapes "$S" --ms ${MS:-64,256,1024} --no-peers \
  --twin PAIRS=true --budget-s ${B1:-370} --out "$O/kernels_v12_${TAG}_run1_h100.json" 2>&1 \
  | grep -v Warning | tail -12
timeout ${T2:-180} python3 $K/sweep_large.py --shapes "$S" --ms ${MS:-64,256,1024} \
  --from "$O/kernels_v12_${TAG}_run1_h100.json" --write-table "$O/h100.json" \
  --out "$O/kernels_v12_${TAG}_run2_h100.json" 2>&1 | grep -v Warning | tail -12
