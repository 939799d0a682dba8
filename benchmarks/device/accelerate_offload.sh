#!/usr/bin/env bash
# A model loaded with device_map="auto" and offloaded by accelerate, quantized by quantize()
# as it is, beside the layer streamer on the same model; then the GPU tests of the offload
# path. Run from the repo root on a 1-GPU host; rows land in ${OUT:-benchmarks/results}.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv
[ -n "$SKIP_TESTS" ] || python3 -m pytest -q -m gpu tests/test_offload.py 2>&1 | tail -3
# 12 Llama-3-8B-shaped layers (5.4 GB fp16 with embeddings and head), peak GPU memory
# uncapped: CPU-resident streaming, then the checkpoint loaded by transformers with 2 GiB of
# GPU layers, the rest offloaded to CPU memory / to disk
timeout 550 python3 benchmarks/streaming/bench_streaming.py --samples 32 --layers 12 --resident-gb 2 \
    --modes streaming,accelerate_cpu,accelerate_disk --out "$OUT/streaming_accelerate.json" \
    2>&1 | grep -v "^Loading"
