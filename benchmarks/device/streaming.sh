#!/usr/bin/env bash
# Layer-streaming measurements (issue: models bigger than one GPU). Run from the repo root on a
# 1-GPU host; rows land in ${OUT:-benchmarks/results}/streaming.json.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv
B="python3 benchmarks/streaming/bench_streaming.py --samples 32 --out $OUT/streaming.json"
# 30 Llama-3-8B-shaped layers (13.6 GB fp16) under a 4 GiB cap: CPU-resident and checkpoint-streamed
timeout 240 $B --layers 30 --cap-gb 4 --modes streaming,streaming_ckpt 2>&1 | grep -v "^Loading"
# a model that fits: the whole-model path vs streaming, same 6 layers
timeout 150 $B --layers 6 --modes in_memory,streaming 2>&1 | grep -v "^Loading"
