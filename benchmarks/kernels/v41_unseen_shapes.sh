#!/bin/bash
# v41 (NOTES.md): shapes outside the tables. There, at M = 17-511, pick_config falls back to the
# shape heuristic (fused tensor-core tiles; M <= 16 the MMA GEMV), while on the table shapes the
# warp-specialized kernel won nearly every M = 64 / 256 row. Interleaved A/B of the heuristic
# against shape-agnostic WS candidates (stream-K balances any tile count), Humming as an arm,
# on Qwen2.5-7B, Llama-2-13B and Llama-3-70B attention shapes (K x N). The results decide a
# Hopper default for M = 16-511 beside tuning.ws_default (M >= 512). On an H100:
#   OUT=/tmp/v41 bash benchmarks/kernels/v41_unseen_shapes.sh
set -u
O=${OUT:-/tmp/v41}; mkdir -p "$O/ab"
cd "$(dirname "$0")/../.."
C='"WS":true,"COAL":true,"OUT16":true'
for sh in ${SHAPES:-3584x18944 18944x3584 5120x13824 13824x5120 8192x8192 8192x10240}; do
  for m in ${MS:-16 64 256}; do
    case $m in
      16) cands=("{$C,\"BM\":16,\"BN\":128,\"MAXNREG\":80,\"STREAM\":2,\"STAGES\":4}"
                 "{$C,\"BM\":16,\"BN\":256,\"WGS\":4,\"STREAM\":1,\"STAGES\":4}") ;;
      64) cands=("{$C,\"BM\":64,\"BN\":256,\"WGS\":4,\"STREAM\":1,\"STAGES\":5}"
                 "{$C,\"BM\":64,\"BN\":128,\"STREAM\":1,\"STAGES\":4}") ;;
      *) cands=("{$C,\"BM\":256,\"BN\":128,\"STREAM\":1,\"STAGES\":3}"
                "{$C,\"BM\":256,\"BN\":128,\"PERSIST\":1,\"STAGES\":3}") ;;
    esac
    args=(); for c in "${cands[@]}"; do args+=(--cfg "$c"); done
    echo "== $sh M=$m"
    timeout 150 python3 benchmarks/kernels/ab.py --shape "$sh" --m "$m" --rounds 7 --humming \
      "${args[@]}" --out "$O/ab/ab_${sh}_m$m.json" 2>&1 | grep -v Warn | tail -5 | cut -c1-80
  done
done
exit 0
