#!/bin/bash
# v24 (NOTES.md): the full GPU test suite after v22's coalesced epilogue, then warp-specialized
# twins with that epilogue at M = 256 / 1024 (128-token tiles, persistent or split, 256 rows per
# program) on the shapes still short of their targets; run 1 and run 2 as v22, > 3 % twice
# into $OUT/$GPU.json.   OUT=/tmp/v24 bash benchmarks/kernels/v24_ws_coal_mid.sh
set -u
O=${OUT:-/tmp/v24}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
[[ -f "$O/$G.json" ]] || cp kernels/configs/$G.json "$O/$G.json"
timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} -p no:cacheprovider tests/ 2>&1 \
  | tail -2
W="WS=true,BM=128,SPLIT_K=1,COAL=true"
SH=${SHAPES:-8192x28672,28672x8192,4096x14336}
timeout ${T1:-180} python3 $K/sweep_large.py --shapes $SH --ms ${MS:-256,1024} --shipped-only \
  --budget-s 160 --twin $W,STAGES=4 --twin $W,STAGES=4,PERSIST=1 \
  --twin $W,BN=256,STAGES=3,PERSIST=1 --twin WS=true,BM=128,STAGES=4,SPLIT_K=2,OUT16=true \
  --no-peers --out "$O/kernels_v24_run1_$G.json" 2>&1 | grep -v Warning | tail -7
timeout ${T2:-120} python3 $K/sweep_large.py --shapes $SH --ms ${MS:-256,1024} \
  --from "$O/kernels_v24_run1_$G.json" --write-table "$O/$G.json" --no-peers \
  --out "$O/kernels_v24_run2_$G.json" 2>&1 | grep -v Warning | tail -7
