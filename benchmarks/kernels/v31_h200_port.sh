#!/bin/bash
# v31 (NOTES.md): v19-v30 on the H200 table. For every shape and M of the H100 table, its
# config (WS persistence, splits, COAL, MAXNREG, STREAM) against the H200 table's in one
# process (run 1) and in a new one (run 2); > 3 % in both goes into $OUT/h200.json. Then the
# whole table with every peer, one process. On an H200:
#   OUT=/tmp/v31 bash benchmarks/kernels/v31_h200_port.sh && cp /tmp/v31/h200.json kernels/configs/
export GPU=${GPU:-h200}
source "$(dirname "$0")/steps.sh" v31 12
[[ $S == *1* ]] && TAIL=42 adopt v31 ${T1:-260} ${T2:-220} --ms ${MS:-1,2,4,8,16,64,256,1024} \
  --cands-table kernels/configs/h100.json --
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && timeout ${TB:-560} python3 $K/bench_w4a16.py --out "$O/kernels_h200.json" \
  2>&1 | grep -v Warning | tail -32
exit 0
