#!/bin/bash
# v28 (NOTES.md): the coalesced epilogue beside the 256-token ring. ws._coal_fits now counts the
# ~4 KB Triton's layout conversion takes for 16-bit outputs (it had reserved a whole [rows, BM]
# tile), so COAL reaches the M >= 256 tiles (their 16-bit scalar stores half-fill 32-byte
# sectors) and 8192x28672 M = 64's 256-row, 6-stage tile, whose COAL had been silently off.
# (1) the WS GPU tests; (2) run 1: the shipped M = 256 / 1024 rows against COAL, persistent-COAL
# and split-2 twins, and the M = 64 row against COAL off, one process; run 2 (a new process)
# each row's winner again; > 3 % in both goes into $OUT/$GPU.json; (3) ROWS with all peers.
#   OUT=/tmp/v28 STEPS=12 bash benchmarks/kernels/v28_ws_coal256.sh, then STEPS=3 ROWS="KxN:M ..."
source "$(dirname "$0")/steps.sh" v28 12
[[ $S == *1* ]] && timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} \
  -p no:cacheprovider tests/test_kernels.py -k "ws" 2>&1 | tail -3
W="WS=true,BM=256,STAGES=3"
[[ $S == *2* ]] && TAIL=12 adopt v28 ${T1:-240} ${T2:-150} --ms ${MS:-256,1024} -- \
  --shipped-only --budget-s 220 --twin COAL=true --twin $W,PERSIST=1,COAL=true \
  --twin $W,PERSIST=0,SPLIT_K=2,OUT16=true
[[ $S == *2* ]] && TAIL=3 adopt v28_m64 ${T3:-60} ${T4:-40} --ms 64 --shapes 8192x28672 -- \
  --shipped-only --budget-s 50 --twin COAL=false
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *3* ]] && bench_rows ${ROWS:-8192x28672:1024 28672x8192:256}
exit 0
