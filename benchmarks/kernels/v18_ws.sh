#!/bin/bash
# v18 (NOTES.md): the warp-specialized Gluon kernel (`WS`, kernels/ws.py) against the shipped
# config of every M = 64 / 256 / 1024 row. (1) its GPU tests; (2) run 1: each row's shipped
# config against its WS twins (BM 256 / 3 stages, BM 128 / 4 stages, BM 64 / 4 stages; the
# token tile is clipped to the tokens), one process; (3) run 2 (a new process): each row's
# winner against the shipped config again; rows that won by > 3 % in both runs go into
# $OUT/$GPU.json (a copy of the shipped table). On an H100 (GPU=h200 on an H200):
#   OUT=/tmp/v18 bash benchmarks/kernels/v18_ws.sh && cp /tmp/v18/h100.json kernels/configs/
source "$(dirname "$0")/steps.sh" v18
MS=${MS:-64,256,1024}
timeout ${T0:-150} python3 -m pytest -m gpu -q -n ${JOBS:-12} -p no:cacheprovider \
  tests/test_kernels.py -k "ws" 2>&1 | tail -3
cp kernels/configs/$G.json "$O/$G.json"   # a fresh copy of the shipped table
adopt v18_ws ${T1:-250} ${T2:-150} --ms $MS -- --shipped-only \
  --twin WS=true,BM=256,STAGES=3 --twin WS=true,BM=128,STAGES=4 --twin WS=true,BM=64,STAGES=4
