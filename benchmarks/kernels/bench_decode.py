"""End-to-end decode throughput on a Llama-3-8B-shaped decoder stack with random weights:
fp16 linears vs the same model after deploy_int4 (RTN asymmetric INT4, block 128).

One decode step = every decoder layer (RMSNorm, GQA attention over a KV cache of CTX tokens
with torch SDPA, SwiGLU MLP) plus an fp16 LM head, captured in a CUDA graph; tokens/s =
batch / median step time. Usage: python benchmarks/kernels/bench_decode.py --out FILE
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import graph_time_us, import_kernels  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256


class RTNQuantizer(nn.Module):
    """Minimal fake-quant weight quantizer exposing the interface deploy_int4 reads."""
    is_int4_block = True

    def __init__(self, block):
        super().__init__()
        self.block = block

    def int4_codes(self, w):
        import importlib

        packing = importlib.import_module(import_kernels().__name__ + ".packing")
        codes, scale, zero = packing.quantize_rtn(w, self.block, symmetric=False)
        return codes, scale, zero, self.block


class Layer(nn.Module):
    def __init__(self, batch, ctx):
        super().__init__()
        hd = HIDDEN // HEADS
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k = nn.Linear(HIDDEN, KV_HEADS * hd, bias=False)
        self.v = nn.Linear(HIDDEN, KV_HEADS * hd, bias=False)
        self.o = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate = nn.Linear(HIDDEN, INTER, bias=False)
        self.up = nn.Linear(HIDDEN, INTER, bias=False)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)
        self.register_buffer("kc", torch.randn(batch, KV_HEADS, ctx, hd))
        self.register_buffer("vc", torch.randn(batch, KV_HEADS, ctx, hd))
        self.n1, self.n2 = nn.RMSNorm(HIDDEN), nn.RMSNorm(HIDDEN)

    def forward(self, x, pos):
        b, hd = x.shape[0], HIDDEN // HEADS
        h = self.n1(x)
        q = self.q(h).view(b, HEADS, 1, hd)
        self.kc.index_copy_(2, pos, self.k(h).view(b, KV_HEADS, 1, hd))
        self.vc.index_copy_(2, pos, self.v(h).view(b, KV_HEADS, 1, hd))
        a = F.scaled_dot_product_attention(q, self.kc, self.vc, enable_gqa=True)
        x = x + self.o(a.reshape(b, HIDDEN))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, layers, batch, ctx):
        super().__init__()
        self.layers = nn.ModuleList(Layer(batch, ctx) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x, pos):
        for layer in self.layers:
            x = layer(x, pos)
        return self.head(x)


def step_us(model, batch, ctx):
    x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.float16)
    pos = torch.tensor([ctx - 1], device="cuda")
    with torch.no_grad():
        return graph_time_us([lambda: model(x, pos)], reps=20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from modelopt_lite.nn.int4_linear import deploy_int4

    rows = []
    for batch in map(int, args.batches.split(",")):
        torch.manual_seed(0)
        with torch.device("cuda"):  # initialised on the GPU: minutes less on the host
            model = Model(args.layers, batch, args.ctx).to(torch.float16)
        for mod in model.layers.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
        fp16_us = step_us(model, batch, args.ctx)
        for mod in model.layers.modules():
            if isinstance(mod, nn.Linear):
                mod.weight_quantizer = RTNQuantizer(128)
        deploy_int4(model)
        torch.cuda.empty_cache()
        int4_us = step_us(model, batch, args.ctx)
        row = {"model": f"Llama-3-8B-shaped, {args.layers} layers, random weights, fp16 LM head",
               "ctx": args.ctx, "batch": batch, "fp16_tok_s": round(batch / fp16_us * 1e6, 1),
               "int4_tok_s": round(batch / int4_us * 1e6, 1), "fp16_step_us": round(fp16_us, 1),
               "int4_step_us": round(int4_us, 1), "gpu": torch.cuda.get_device_name(),
               "date": datetime.date.today().isoformat()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
