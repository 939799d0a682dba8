#!/bin/bash
# v51b (NOTES.md): tuning.gemv_mma_default, the Hopper rule for 1-4 tokens on shapes without a
# table row, against what those shapes took before it (tuning.ws_default's 16-token tile, else
# the shape heuristic) on shapes not used to choose the rule; Humming as an arm. "shipped" is the
# rule, cfg0 the old choice. On a Hopper GPU:
#   OUT=/tmp/v51b bash benchmarks/kernels/v51b_heldout.sh
set -u
O=${OUT:-/tmp/v51b}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
for run in ${RUNS:-4096x6144:1 4096x6144:4 5120x27648:1 5120x27648:2 27648x5120:1 27648x5120:4 \
    2560x9728:1 2560x9728:4 3072x8192:1 8192x3072:3 11008x4096:1 11008x4096:4 4096x4096:2 \
    14336x4096:2}; do
  sh=${run%:*}; m=${run#*:}
  old=$(python3 - "$sh" "$m" <<'PY'
import json, sys
from modelopt_lite.kernels.tuning import default_config, ws_default
k, n = map(int, sys.argv[1].split("x")); m = int(sys.argv[2])
print(json.dumps(ws_default(m, n, k, 128, (9, 0)) or default_config(m, n, k, 132, 227 * 1024)))
PY
)
  echo "== $sh M=$m (cfg0: before)"
  timeout 90 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --humming \
    --cfg "$old" --out "$O/ab/v51b_${sh}_m$m.json" 2>&1 | grep -v Warn | tail -4 | cut -c1-100
done
exit 0
