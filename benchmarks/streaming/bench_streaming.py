"""Calibrate a Llama-shaped random-weight model layer by layer: peak GPU memory and wall time.

Rows go to ``benchmarks/results/streaming.json`` (or ``--out``):
``{"model", "params", "model_bytes", "gpu_cap_bytes", "peak_gpu_bytes", "wall_s", "mode", "gpu",
"date", ...}``. Modes: ``in_memory`` (the whole model on the GPU), ``streaming`` (model in CPU
memory, one layer at a time on the GPU), ``streaming_ckpt`` (meta model, each layer read from
safetensors shards onto the GPU), ``accelerate_cpu`` / ``accelerate_disk`` (``from_pretrained(
device_map="auto")`` with ``--resident-gb`` (default half the GPU cap) for resident layers and the rest offloaded by
accelerate to CPU memory / to disk; quantize() streams the offloaded layers itself). There,
``peak_gpu_bytes`` is quantize()'s own peak; the rows add ``load_peak_gpu_bytes`` (loading's),
``resident_gpu_bytes`` (what loading left on the GPU) and ``placement`` (modules per device).

    # GPU: a 30-layer 4096/14336 fp16 model (13.6 GB) under a 4 GiB cap, AWQ
    python benchmarks/streaming/bench_streaming.py --layers 30 --cap-gb 4 --modes streaming
    # the same model loaded with device_map="auto", offloaded by accelerate to CPU memory
    python benchmarks/streaming/bench_streaming.py --layers 30 --cap-gb 4 --modes accelerate_cpu
    # CPU smoke run of the same code
    python benchmarks/streaming/bench_streaming.py --device cpu --hidden 256 --inter 512 \\
        --layers 4 --vocab 1000 --samples 4 --seq 64 --dtype float32 --modes in_memory,streaming
"""

from __future__ import annotations

import argparse
import collections
import gc
import datetime
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

import modelopt_lite as mtl
from modelopt_lite.calib.streaming import load_streaming, stream_layers

RESULTS = Path(__file__).resolve().parents[1] / "results" / "streaming.json"


def llama_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads,
                       num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq, 2048),
                       tie_word_embeddings=False)


@torch.no_grad()
def random_llama(a, dtype):
    """Random N(0, 0.02) weights, norms 1; one random layer cloned (fast for 10+ GB models)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(llama_config(a))
    g = torch.Generator().manual_seed(0)

    def rand(shape, norm):
        if norm:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    template = {n: rand(p.shape, "norm" in n) for n, p in model.model.layers[0].named_parameters()}
    state = {}
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            rel = name.split(".", 3)[3]
            state[name] = template[rel].clone()
        else:
            state[name] = rand(p.shape, "norm" in name)
    model.load_state_dict(state, assign=True)
    return model.eval()


def nbytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quant_config(method):
    if method == "awq":
        return "int4_awq"
    return "w8a8"


def run_once(a, mode, dtype, tokens, ckpt_dir=None):
    dev = torch.device(a.device)
    cap = None
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        cap = int(a.cap_gb * 2**30) if a.cap_gb else total
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
        torch.cuda.reset_peak_memory_stats(dev)
    if mode == "streaming_ckpt":
        model = load_streaming(ckpt_dir, dtype=dtype)
    elif mode.startswith("accelerate"):
        model = dispatched(a, mode, dev, cap, dtype, ckpt_dir)
        if dev.type == "cuda":   # loading's own peak apart: peak_gpu_bytes is quantize()'s
            torch.cuda.synchronize(dev)
            load_peak = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
    else:
        model = random_llama(a, dtype)
    size, params = nbytes_of(a, dtype)
    logging.info("%s: %.2f GB model, %d params", mode, size / 1e9, params)
    t0 = time.perf_counter()
    offloaded = None
    if mode == "in_memory":
        model.to(dev)
        mtl.quantize(model, quant_config(a.method), calib=tokens, progress=a.progress)
    elif mode.startswith("accelerate"):   # device_map: quantize() streams what is offloaded
        placed = getattr(model, "hf_device_map", {})
        offloaded = sum(v in ("cpu", "disk") for v in placed.values()) if dev.type == "cuda" \
            else sum(v == "disk" for v in placed.values())
        resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
        mtl.quantize(model, quant_config(a.method), calib=tokens, progress=a.progress)
    else:
        with stream_layers(model, dev, store_device=a.store_device):
            mtl.quantize(model, quant_config(a.method), calib=tokens, progress=a.progress)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    row = {"model": f"llama-random-h{a.hidden}-i{a.inter}-l{a.layers}-{a.dtype}",
           "params": params, "model_bytes": size, "gpu_cap_bytes": cap, "peak_gpu_bytes": peak,
           "wall_s": round(wall, 2), "mode": mode, "gpu": gpu_name(dev),
           "date": datetime.date.today().isoformat(), "method": a.method,
           "calib_tokens": int(tokens.numel()), "layers": a.layers,
           "s_per_layer": round(wall / a.layers, 3)}
    if offloaded is not None:
        row["offloaded_modules"] = offloaded
        row["resident_gpu_bytes"] = resident
        row["placement"] = {str(k): v for k, v in collections.Counter(
            str(d) for d in placed.values()).items()}
        if dev.type == "cuda":
            row["load_peak_gpu_bytes"] = load_peak
    del model
    gc.collect()   # a dispatched model sits in reference cycles (accelerate's hooks): without
    return row     # this its GPU layers stay allocated into the next mode's run


def dispatched(a, mode, dev, cap, dtype, ckpt_dir):
    """The checkpoint loaded by transformers with ``device_map="auto"``: layers on the GPU
    up to half the cap, the rest offloaded to CPU memory or (``accelerate_disk``) to disk."""
    from transformers import AutoModelForCausalLM

    cpu = "1GiB" if mode == "accelerate_disk" else "400GiB"
    if dev.type == "cpu":   # (a smoke run: half the model in CPU memory, the rest on disk)
        memory = {"cpu": f"{nbytes_of(a, dtype)[0] / 2 / 2**30:.3f}GiB"}
    else:
        resident = a.resident_gb * 2**30 if a.resident_gb else cap / 2
        memory = {dev.index: f"{resident / 2**30:.2f}GiB", "cpu": cpu}
    return AutoModelForCausalLM.from_pretrained(
        ckpt_dir, dtype=dtype, device_map="auto", max_memory=memory,
        offload_folder=tempfile.mkdtemp(dir=ckpt_dir)).eval()


def nbytes_of(a, dtype):
    from transformers import LlamaForCausalLM
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = LlamaForCausalLM(llama_config(a))
    n = sum(p.numel() for p in m.parameters())
    return n * torch.tensor([], dtype=dtype).element_size(), n


def gpu_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{platform.machine()}"


def write_ckpt(a, dtype, folder):
    model = random_llama(a, dtype)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--method", default="awq", choices=["awq", "max"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--cap-gb", type=float, default=0.0, help="GPU memory cap (0: none)")
    p.add_argument("--resident-gb", type=float, default=0.0,
                   help="accelerate_*: GPU memory for resident layers (0: half the cap)")
    p.add_argument("--store-device", default="auto")
    p.add_argument("--modes", default="streaming")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, a.dtype)
    tokens = torch.randint(0, a.vocab, (a.samples, a.seq), generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        for mode in a.modes.split(","):
            if ckpt is None and mode in ("streaming_ckpt", "accelerate_cpu", "accelerate_disk"):
                ckpt = write_ckpt(a, dtype, tmp)   # once: every mode reads it as written
            row = run_once(a, mode, dtype, tokens, ckpt)
            print(json.dumps(row), flush=True)
            rows.append(row)
            append_rows(a.out, [row])
    return rows


def append_rows(path, rows):
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
