#!/bin/bash
# Nsight Compute profile of ours and a peer, one call each per M (ncu_run.py), full section set.
# Writes $OUT/<tag>.ncu-rep, its details page as text and a CSV of the raw metrics.
#   OUT=/tmp/prof SHAPE=8192x28672 MS=1,64,1024 PEER=humming bash benchmarks/kernels/ncu_profile.sh
set -u
O=${OUT:-/tmp/prof}; mkdir -p "$O"
cd "$(dirname "$0")/../.."
SHAPE=${SHAPE:-8192x28672}; MS=${MS:-1,16,64,256,1024}; PEER=${PEER:-humming}
TAG=${TAG:-ncu_${SHAPE}}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
"$NCU" --clock-control none --profile-from-start off --set full ${NCU_ARGS:-} -f -o "$O/$TAG" \
  python3 benchmarks/kernels/ncu_run.py --shape "$SHAPE" --ms "$MS" --peer "$PEER" 2>&1 \
  | grep -v Warning | tail -${TAIL:-15}
"$NCU" --import "$O/$TAG.ncu-rep" --page details > "$O/$TAG.txt" 2>&1
"$NCU" --import "$O/$TAG.ncu-rep" --page raw --csv > "$O/$TAG.csv" 2>&1
ls -la "$O"
