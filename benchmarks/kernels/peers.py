"""Peer W4A16 implementations for the benchmark: each builder returns forward callables, one
per rotating weight copy, or raises with the reason it cannot run."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cublas(w16, x, n_copies):
    ws = [w16.clone() for _ in range(n_copies)]
    return [lambda w=w: F.linear(x, w) for w in ws]


def tinygemm(codes, scale, zero, group, x, n_copies):
    n, k = codes.shape
    c = codes.to(torch.int32)
    packed_u8 = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)
    w_pack = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    # tinygemm: w = (q - 8) * s + zp  ->  zp = (8 - z) * s
    s = scale.to(torch.bfloat16)
    zp = ((8 - zero) * scale).to(torch.bfloat16)
    sz = torch.stack([s.t(), zp.t()], dim=-1).contiguous()
    xb = x.to(torch.bfloat16)
    packs = [(w_pack.clone(), sz.clone()) for _ in range(n_copies)]
    return [lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p[0], group, p[1]) for p in packs]


def gemlite(codes, scale, zero, group, x, n_copies):
    from gemlite.helper import A16Wn

    layers = [A16Wn(device="cuda", dtype=torch.float16).from_weights(
        codes.clone(), scale.half(), zero.half(), 4, group) for _ in range(n_copies)]
    return [lambda lay=lay: lay(x) for lay in layers]


def humming(w16, group, x, n_copies):
    from humming.layer import HummingLayer

    n, k = w16.shape
    layers = []
    for _ in range(n_copies):
        lay = HummingLayer(shape_n=n, shape_k=k, weight_config={
            "dtype": "uint4", "group_size": group, "has_zero_point": True},
            torch_dtype=torch.float16).cuda()
        lay.load_from_unquantized(w16)
        lay.transform()
        layers.append(lay)
    return [lambda lay=lay: lay(x) for lay in layers]


def check(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()
