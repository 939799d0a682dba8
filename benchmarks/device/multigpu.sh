#!/usr/bin/env bash
# 2-GPU data-parallel AWQ check (issue: multi-GPU calibration). Run from the repo root on a
# 2-GPU host; results land in ${OUT:-benchmarks/results}/multigpu.json.
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout ${MG_TIMEOUT:-400} torchrun --nproc_per_node 2 benchmarks/streaming/multigpu_awq.py \
    --out "$OUT/multigpu.json" "$@" 2>&1 | grep -v "^Loading\|Warning" | tee "$OUT/multigpu.log"
