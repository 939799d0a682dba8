#!/bin/bash
# v27 (NOTES.md; prepared, not yet run): v25's two-programs-per-SM WS config (MAXNREG 80, 16-token
# tiles, 4 stages, coalesced epilogue) at M = 1 / 2 / 4 / 8, where the mma kernel serves the
# large shapes (8192x28672 M = 4: 56.5 us, Humming 50.9; the WS config read 52.3 at M = 16), and
# with K splits 2 / 4 for 28672x8192's 64 row tiles. Then the rows it changed with all peers.
# On an H100:   OUT=/tmp/v27 bash benchmarks/kernels/v27_regs_tiny_m.sh
source "$(dirname "$0")/steps.sh" v27 12
W="WS=true,BM=16,OUT16=true,COAL=true,MAXNREG=80"
[[ $S == *1* ]] && adopt v27 ${T1:-200} ${T2:-100} --shapes ${SHAPES:-8192x28672,28672x8192} \
  --ms ${MS:-1,2,4,8} -- --shipped-only --budget-s 180 --twin $W,STAGES=4,SPLIT_K=1 \
  --twin $W,STAGES=4,SPLIT_K=2 --twin $W,STAGES=4,SPLIT_K=4 --twin $W,STAGES=6,SPLIT_K=2
export MODELOPT_LITE_KERNEL_CONFIGS="$O/$G.json"
[[ $S == *2* ]] && bench_rows ${ROWS:-8192x28672:4 28672x8192:4}
exit 0
