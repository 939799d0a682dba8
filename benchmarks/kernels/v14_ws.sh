#!/bin/bash
# v14 (NOTES.md): split-K through the self-cleaning workspace (WS, one kernel per call) against
# the zeroed-buffer path (WS=false: a fill kernel before, for float32 a conversion after), the
# shipped configs of each (shape, M) in one process, with cuBLAS and Humming. WS lost on every
# row and was removed: run this at commit ea7cb92, which has it.
#   OUT=/tmp/v14 SHAPES=8192x28672,28672x8192 MS=1,4,16,64,256 bash benchmarks/kernels/v14_ws.sh
set -u
O=${OUT:-/tmp/v14}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
S=${SHAPES:-8192x28672,28672x8192}
timeout ${T:-540} python3 benchmarks/kernels/sweep_large.py --shapes "$S" \
  --ms ${MS:-1,4,16,64,256} \
  --shipped-only --twin WS=false --out "$O/${TAG:-kernels_v14_ws_ab_h100}.json" 2>&1 \
  | grep -v Warning | tail -${TAIL:-16}
