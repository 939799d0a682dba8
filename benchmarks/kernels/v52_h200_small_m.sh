#!/bin/bash
# v52 (NOTES.md, v51's lead 1; run 2026-11-29, outcome in NOTES.md): on the H200 the small-M rows stream at ~70 % of the
# measured read floor (30 us on the Llama-3-70B shapes), bound by the kernel's work per byte, not
# by memory. FS 1 / 2 put the scales after the products in float32 (-7 % / -15 % SASS on the
# shipped M = 1 tiles, `mma_regs.py`; registers 72 -> 88 / 92 at 4 warps x 2 rows, 7 -> 5
# programs per SM; 128 -> 137 / 142 at 2 warps x 4 rows, 8 -> 7): interleaved A/B against each
# shipped row that is an MMA config (FS means nothing to the WS kernel), Humming as an arm.
# XPERM (activations permuted once per call, one 16-byte B-fragment load for two planes) cuts
# the loop's loads per 4 chunks from 44 (32 of them 8-byte activation loads, one per mma) to 28
# at 4 warps x 2 rows, at the same registers: a lead if the H200's limit is load issue rather
# than arithmetic.
# On an H200:
#   OUT=/tmp/v52 bash benchmarks/kernels/v52_h200_small_m.sh
set -u
O=${OUT:-/tmp/v52}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
for sh in ${SHAPES:-8192x28672 28672x8192 4096x14336 14336x4096}; do
  for m in ${MS:-1 4 16}; do
    python3 - "$sh" "$m" <<'PY' || { echo "== $sh M=$m: not an MMA row, skipped"; continue; }
import sys
sys.path.insert(0, "benchmarks/kernels")
from sweep_large import table_config
k, n = map(int, sys.argv[1].split("x"))
cfg = table_config("kernels/configs/h200.json", int(sys.argv[2]), n, k) or {}
sys.exit(0 if cfg.get("MMA") and not cfg.get("WS") else 1)
PY
    echo "== $sh M=$m"
    timeout 120 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --humming \
      --twin FS=1 --twin FS=2 --twin XPERM=true --twin XPERM=true,FS=2 \
      --out "$O/ab/ab_${sh}_m$m.json" 2>&1 | grep -v Warn | tail -4 | cut -c1-100
  done
done
exit 0
