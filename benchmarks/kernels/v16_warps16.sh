#!/bin/bash
# v16 (NOTES.md; run 2026-11-27 on an H100: slower on 15 of 15 rows, nothing adopted): fused
# tiles with 16 warps (4 warpgroups of 64 rows),
# which compile for sm_90a with no spills and no wgmma serialization (test_kernel_codegen.py):
# BN 256 x BM 128 (128 registers) halves the activation tile's L2 re-reads per weight byte
# against the shipped BM 256 x BN 128 tile at M >= 256; BN 256 x BM 64 (112 registers, vs 183
# with 8 warps) gives the latency-bound M = 64 tile twice the warps. Run 1: these tiles (K split
# 1 / 2 / 4, fp16 atomics where split) against the shipped config of every M = 64 / 256 / 1024
# row, one process; run 2 (a new process): each row's winner again; rows that won by > 3 % in
# both runs go into $OUT/$GPU.json. On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v16 bash benchmarks/kernels/v16_warps16.sh && cp /tmp/v16/h100.json kernels/configs/
set -u
O=${OUT:-/tmp/v16}; mkdir -p "$O"
G=${GPU:-h100}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
K=benchmarks/kernels
MS=${MS:-64,256,1024}
CANDS=$(python3 - <<'PY'
import json
c = []
for bm, bn, st, splits in ((64, 256, 4, (1, 2, 4)), (64, 256, 3, (1, 2)), (128, 256, 3, (1, 2)),
                           (128, 256, 4, (1,)), (128, 128, 4, (1, 2))):
    for sk in splits:
        c.append(dict(BM=bm, BN=bn, SPLIT_K=sk, num_warps=16, num_stages=st, FUSE_K=True,
                      GROUP_N=8, PAIRS=2, **({"OUT16": True} if sk > 1 else {})))
print(json.dumps(c))
PY
)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
cp kernels/configs/$G.json "$O/$G.json"
timeout ${T1:-400} python3 $K/sweep_large.py --ms $MS --cands "$CANDS" --no-peers \
  --budget-s ${B1:-380} --out "$O/kernels_v16_warps16_run1_$G.json" 2>&1 | grep -v Warning | tail -16
timeout ${T2:-150} python3 $K/sweep_large.py --ms $MS --from "$O/kernels_v16_warps16_run1_$G.json" \
  --write-table "$O/$G.json" --no-peers --out "$O/kernels_v16_warps16_run2_$G.json" 2>&1 \
  | grep -v Warning | tail -16
