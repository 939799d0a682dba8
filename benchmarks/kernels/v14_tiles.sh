#!/bin/bash
# v14 (NOTES.md): the PAIRS tiles x K splits again with the transposed words (PAIRS 2) on the two
# large shapes (run 1), then the winners against the shipped dispatch in a new process (run 2);
# rows that won by > 3 % in both runs go into $OUT/h100.json (a copy of the shipped table).
#   OUT=/tmp/v14 bash benchmarks/kernels/v14_tiles.sh
set -u
O=${OUT:-/tmp/v14}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
S=${SHAPES:-8192x28672,28672x8192}
cp kernels/configs/h100.json "$O/h100.json"
timeout ${T1:-380} python3 $K/sweep_large.py --shapes $S --ms ${MS:-64,256} --no-peers \
  --pair-tiles 2 \
  --budget-s ${B1:-350} --out "$O/kernels_v14_tiles_run1_h100.json" 2>&1 | grep -v Warning | tail -6
timeout ${T2:-150} python3 $K/sweep_large.py --shapes $S --ms ${MS:-64,256} \
  --from "$O/kernels_v14_tiles_run1_h100.json" --write-table "$O/h100.json" \
  --out "$O/kernels_v14_tiles_run2_h100.json" 2>&1 | grep -v Warning | tail -6
diff <(python3 -m json.tool kernels/configs/h100.json) <(python3 -m json.tool "$O/h100.json")
