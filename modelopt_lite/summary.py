"""The end-of-run report: what was quantized, what was skipped and why, and each layer's error."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import quant_modules


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |approx - ref|^2) in dB, in
    float64; inf when they are equal."""
    ref64 = ref.double()
    noise = (approx.double() - ref64).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref64.pow(2).sum().item() / noise)


def weight_sqnr_db(module) -> float:
    """SQNR of a fake-quant layer's weight against its quantized value, in dB (inf for a weight
    already on the grid, e.g. after GPTQ, whose error the layer records keep instead)."""
    with torch.no_grad():
        w = module.weight_2d()
        return sqnr_db(w, module.weight_quantizer(w))


def _offloaded_sqnr(model: nn.Module, name: str, module, cache: list) -> float:
    """weight_sqnr_db, reading a weight accelerate offloads (on ``meta`` in the model) from
    the offload store (built on first need into ``cache``) onto where its ranges live."""
    from .calib.offload import at_hand, offloaded_weights

    if module.weight.is_meta and not cache:
        cache.append(offloaded_weights(model))
    with at_hand(cache[0] if cache else None, name, module):
        return weight_sqnr_db(module)


def summary_rows(model: nn.Module) -> list[dict]:
    """One row per layer quantize() planned: name, shape, status ("quantized", "deployed" for
    a layer deploy() swapped for an Int4Linear, or "skipped"), format, sqnr_db and a note."""
    state = getattr(model, "_modelopt_lite", None) or {}
    quantized = dict(quant_modules(model))
    from .nn.int4_linear import int4_layers

    deployed = int4_layers(model)   # layers deploy() swapped for INT4 kernels
    offload: list = []   # accelerate's offloaded weights, looked up on first need
    rows = []
    for rec in state.get("layers", []):
        row = {"name": rec["name"], "shape": "x".join(map(str, rec["weight_shape"]))}
        module = quantized.get(rec["name"])
        if not rec["skipped"] and module is None and rec["name"] in deployed:
            spec = deployed[rec["name"]].spec()
            fmt = (f"W int4 block {spec['group_size']}"
                   f"{' sym' if spec['symmetric'] else ''} (Int4Linear)")
            row.update(status="deployed", format=fmt, sqnr_db=rec.get("weight_sqnr_db"),
                       reason="packed INT4, " + (
                           "float32 product (the model keeps this layer in float32)"
                           if spec.get("keep_float32") else "runs on the W4A16 kernels"))
        elif rec["skipped"] or module is None:
            row.update(status="skipped", format="-", sqnr_db=None,
                       reason=rec["skipped"] or "not quantized")
        else:
            w, a = module.weight_quantizer, module.input_quantizer
            fmt = f"W {w.spec.describe()}" if w.enabled else "W fp"
            if a.enabled:
                fmt += f" / A {a.spec.describe()}"
            note = rec.get("note") or ""
            sqnr = rec.get("weight_sqnr_db")
            if sqnr is None and w.enabled:
                sqnr = _offloaded_sqnr(model, rec["name"], module, offload)
                if math.isinf(sqnr):  # on the grid, no recorded error (e.g. loaded GPTQ weights)
                    sqnr = None
                    note = note or "weight already on the quantization grid"
            row.update(status="quantized", format=fmt, sqnr_db=sqnr, reason=note)
        rows.append(row)
    return rows


def _collapse_experts(model: nn.Module, rows: list[dict]) -> list[dict]:
    """One line for the same projection of every expert of a MoE layer (``experts.*.up_proj``)
    when they share shape, status and format; its SQNR is the worst expert's."""
    from .moe import LinearExperts

    paths = {n for n, m in model.named_modules() if isinstance(m, LinearExperts)}
    if not paths:
        return rows
    out, merged = [], {}
    for r in rows:
        head, _, proj = r["name"].rpartition(".")
        base, _, idx = head.rpartition(".")
        if base not in paths or not idx.isdigit():
            out.append(r)
            continue
        key = (base, proj, r["shape"], r["status"], r["format"], r["reason"])
        if key not in merged:
            merged[key] = dict(r, name=f"{base}.*.{proj}", _rows=[])
            out.append(merged[key])
        merged[key]["_rows"].append(r)
    for m in merged.values():
        sq = [r["sqnr_db"] for r in m["_rows"] if r["sqnr_db"] is not None]
        m["sqnr_db"] = min(sq) if sq else None
        n = len(m.pop("_rows"))
        m["reason"] = f"{n} experts, worst SQNR" + (f"; {m['reason']}" if m["reason"] else "")
    return out


def format_summary(model: nn.Module) -> str:
    rows = summary_rows(model)
    if not rows:
        return "model is not quantized by modelopt_lite"
    lines = [f"{'layer':<44} {'shape':>11}  {'status':<9} {'format':<36} {'W SQNR':>7}  note"]
    for r in _collapse_experts(model, rows):
        sqnr = "" if r["sqnr_db"] is None else f"{r['sqnr_db']:6.1f}dB"
        lines.append(f"{r['name'][:44]:<44} {r['shape']:>11}  {r['status']:<9} "
                     f"{r['format'][:36]:<36} {sqnr:>7}  {r['reason']}")
    n_q = sum(r["status"] == "quantized" for r in rows)
    n_d = sum(r["status"] == "deployed" for r in rows)
    lines.append(f"{n_q + n_d} layer(s) quantized" + (f" ({n_d} deployed)" if n_d else "")
                 + f", {len(rows) - n_q - n_d} skipped")
    return "\n".join(lines)


def print_summary(model: nn.Module) -> None:
    """Print which layers were quantized (format, shape, weight SQNR) and which were skipped."""
    print(format_summary(model))  # noqa: T201 - printing is this function's job
