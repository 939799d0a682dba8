#!/bin/bash
# v51 (NOTES.md, v50's leads): shapes outside the tables at 1-4 tokens. There pick_config gives
# layers of >= 16-24 M weights the warp-specialized 16-token stream-K tile (tuning._WS_MID,
# v41), smaller ones the shape heuristic; on the two table shapes that tile's kin lost 4-5 %
# to the 4-warp MMA GEMV (BN 64, SV 4, evict-first word loads) with a K split of about 7-14
# programs per SM (v50). Interleaved A/B of the shipped choice against that GEMV at two splits
# (the K splits nearest 7 and 14 programs per SM that keep SV 4), Humming as an arm. The
# results decide a Hopper default for M <= 4 (run on an H200 on 2026-11-28: NOTES.md, v51). On Hopper:
#   OUT=/tmp/v51 bash benchmarks/kernels/v51_unseen_small_m.sh
set -u
O=${OUT:-/tmp/v51}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
for sh in ${SHAPES:-3584x18944 18944x3584 5120x13824 13824x5120 8192x8192 8192x10240 5120x5120 2048x8192}; do
  for m in ${MS:-1 4}; do
    mapfile -t cands < <(python3 - "$sh" <<'PY'
import sys
k, n = map(int, sys.argv[1].split("x"))
kt, tiles, sms = k // 128, -(-n // 64), 132
ok = [s for s in range(1, kt + 1) if kt % s == 0 and (kt // s) % 4 == 0] or [1]
base = '"MMA":true,"BN":64,"num_warps":4,"PREFETCH":false,"OUT16":true,"SV":4,"QE":"evict_first"'
for per_sm in sorted({min(ok, key=lambda s: abs(tiles * s - p * sms)) for p in (7, 14)}):
    print("{%s,\"SPLIT_K\":%d}" % (base, per_sm))
PY
)
    args=(); for c in "${cands[@]}"; do args+=(--cfg "$c"); done
    echo "== $sh M=$m"
    timeout 120 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --humming \
      "${args[@]}" --out "$O/ab/ab_${sh}_m$m.json" 2>&1 | grep -v Warn | tail -5 | cut -c1-100
  done
done
exit 0
