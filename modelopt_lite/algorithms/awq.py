"""AWQ: activation-aware INT4 weight quantization, one decoder layer at a time.

For every group of linears that share an input (q/k/v, gate/up, v->o, up->down, per the
architecture table in :mod:`modelopt_lite.models`) a per-input-channel scale ``s`` is
searched over an alpha grid, minimising the error of the output of the block the linears feed
(``self_attn``, ``mlp``, ``down_proj``...), and folded exactly into the producer. Then each
weight's range is shrunk per (output row, block) to minimise that block's output error, and
the weights are rounded onto those ranges with GPTQ's error feedback
(:mod:`modelopt_lite.algorithms.gptq`; ``AWQConfig(gptq=False)`` rounds to nearest). The
layer's quantized output feeds the next layer (:func:`~modelopt_lite.calib.sequential.run_sequential`).

Results: the folded weights and the quantizers' ``amax``/``amin`` go into ``mtl.save``
checkpoints; :func:`save_artefacts` also writes the scales and ranges (and the GPTQ-rounded
weights) on their own, and
``AWQConfig(artefacts=dir)`` re-applies them to a fresh float model with no calibration.

Example::

    model = mtl.quantize(model, "int4_awq", calib=texts, tokenizer=tok)
    save_artefacts(model, "awq_out/")
    cfg = get_preset("int4_awq").replace(algorithm=AWQConfig(artefacts="awq_out/"))
    fresh = mtl.quantize(fresh_model, cfg)       # same weights and ranges, no calibration
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..calib.distributed import (broadcast_, global_offset, local_indices, rank, reduce_sum,
                                reduce_sum_, world_size)
from ..config import ConfigError, QuantConfig, QuantizerSpec, register_algorithm, register_preset
from ..models import Group, apply_group_scale_, calibration_blocks, layer_groups, tie_scale
from ..moe import shared_input_key
from ..nn.quant_modules import is_quantized
from ..nn.tensor_quantizer import CalibrationError
from . import awq_search as S
from . import register_applier, without_convs
from ..sparsity.sparsegpt import HessianAccumulator
from .gptq import gptq_round_linears
from .rtn import calibrate_activations

logger = logging.getLogger(__name__)

ARTEFACT_TENSORS = "awq_artefacts.safetensors"
ARTEFACT_MANIFEST = "awq_artefacts.json"


@register_algorithm("awq")
@dataclass(frozen=True)
class AWQConfig:
    """AWQ search settings.

    ``n_grid``: alpha grid points (``a = i / n_grid``; the identity scale is always tried too).
    ``duo_scaling``: candidate ``s = x^a / w^(1-a)`` (else ``x^a``), with ``x`` the mean |act|
    and ``w`` the block-normalised mean |weight| per input channel. ``search_tokens``: tokens
    (whole calibration batches, spread over the set) replayed through a block per candidate.
    ``clip``: search ranges per (row, block) over ``clip_grid`` ratios from 1 down to
    ``clip_min_ratio`` (error measured on every calibration token through block Gram
    matrices). ``device``: where each decoder layer runs (e.g. "cuda"; the rest stays put).
    ``artefacts``: a folder from :func:`save_artefacts`; apply its scales and ranges instead
    of searching. ``gqa_v_o``: also search ``v_proj -> o_proj`` under grouped-query attention,
    the scale tied over each kv head's repeated copies (off by default: on SmolLM2-135M it
    raised perplexity 14.99 -> 15.05 and left Gemma-3-270M unchanged, before GPTQ rounding).
    ``gptq``: after the scale and clip searches, round each weight onto its (searched) grid
    with GPTQ's second-order error feedback (:mod:`modelopt_lite.algorithms.gptq`) instead of
    to nearest, on the Hessian of all calibration tokens; same format and ranges (Gemma-3-270M
    sym 15.86 -> 14.75, SmolLM2-135M 14.99 -> 14.40). ``gptq_damp``: its dampening, a
    fraction of the Hessian's mean diagonal. ``fold_only``: search scales only for groups
    whose scale folds into a producer (a norm or linear of the architecture's table row), and
    leave the other linears unscaled (clipped and rounded only), instead of scaling their
    inputs with an explicit multiply; for checkpoints that cannot carry a multiply
    (:func:`modelopt_lite.export.hf.export_hf`), e.g. an architecture without a table row.
    """

    name: ClassVar[str]
    n_grid: int = 20
    duo_scaling: bool = True
    search_tokens: int = 2048
    clip: bool = True
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    device: str | None = None
    artefacts: str | None = None
    gqa_v_o: bool = False
    gptq: bool = True
    gptq_damp: float = 0.01
    fold_only: bool = False

    def __post_init__(self):
        if self.n_grid < 20:
            raise ConfigError(f"n_grid={self.n_grid}: AWQ searches at least 20 alpha points")
        if self.search_tokens < 1:
            raise ConfigError(f"search_tokens must be >= 1, got {self.search_tokens}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ConfigError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.clip_grid < 1 or not 0.0 < self.clip_min_ratio <= 1.0:
            raise ConfigError("clip_grid must be >= 1 and clip_min_ratio in (0, 1], got "
                              f"{self.clip_grid}, {self.clip_min_ratio}")


def _int4(symmetric: bool, block: int = 128) -> QuantConfig:
    return QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=block,
                                            symmetric=symmetric),
                       algorithm=AWQConfig(), on_indivisible="skip")


register_preset("int4_awq", _int4(True))
register_preset("int4_awq_asym", _int4(False))


# --- the walker ---

@register_applier("awq")
def apply(model: nn.Module, config: QuantConfig, forward_loop=None, progress: bool = True):
    algo = config.algorithm
    if algo.artefacts is not None:
        apply_artefacts(model, algo.artefacts)
    else:
        if forward_loop is None:
            raise CalibrationError("AWQ needs calibration data: pass calib= or forward_loop= to "
                                   "quantize(), or AWQConfig(artefacts=dir) to reuse a search")
        from ..calib.sequential import run_sequential

        record = {}
        process = lambda i, name, layer, inputs: _process_layer(  # noqa: E731
            model, name, layer, inputs, algo, record)
        offload = "cpu" if algo.device is not None else None
        run_sequential(model, forward_loop, process, device=algo.device, offload=offload,
                       progress=progress, desc="awq")
        model._awq_scales = record
        model._awq_gptq = algo.gptq
    calibrate_activations(model, forward_loop)


def _weight_quantized(module: nn.Module) -> bool:
    return is_quantized(module) and module.weight_quantizer.enabled


def _process_layer(model, name, layer, inputs, algo: AWQConfig, record: dict) -> None:
    linears = without_convs({n: m for n, m in layer.named_modules() if _weight_quantized(m)},
                            f"awq {name or type(layer).__name__}", "keep max ranges")
    if not linears:
        return
    groups = [g for g in layer_groups(model, layer, kv_tied=algo.gqa_v_o)
              if any(n in linears for n in g.linears)
              and not (algo.fold_only and g.prev is None)]
    device = next(layer.parameters()).device
    subset = _search_entries(inputs, algo.search_tokens)
    with _float_weights(linears.values()):
        cap = _capture(layer, inputs, groups, linears, subset, device, algo.gptq)
        for group in [g for g in groups if g.linears[0] in cap.absmean]:   # called ones only
            s = _search_group(layer, group, linears, cap, algo)
            apply_group_scale_(layer, group, s)
            cap.scale[group.linears[0]] = s
            record[f"{name}::{','.join(group.linears)}"] = s.detach().cpu()
    _set_clips(linears, cap, groups, algo)
    if algo.gptq:
        _gptq_round(linears, cap, groups, algo)
    cap.clear()


def _set_clips(linears: dict, cap: _Capture, groups, algo: AWQConfig) -> None:
    """Clip search of every linear; under torch.distributed the linears are dealt out to the
    ranks round-robin and each range is broadcast from the rank that searched it."""
    world, me = world_size(), rank()
    for k, (rel, m) in enumerate(linears.items()):
        if k % world == me:
            _set_clip(m, cap, _input_key(rel, groups), algo)
        else:  # the right shapes, overwritten by the broadcast below
            m.weight_quantizer.init_from_weight(m.weight_2d().detach().float())
    if world > 1:
        for k, m in enumerate(linears.values()):
            q = m.weight_quantizer
            for t in (q.amax, q.amin):
                if t is not None:
                    broadcast_(t, src=k % world)


class _float_weights:
    """Context: the given modules' weight quantizers pass weights through unchanged."""

    def __init__(self, modules):
        self.quantizers = [m.weight_quantizer for m in modules]

    def __enter__(self):
        for q in self.quantizers:
            q.enabled = False

    def __exit__(self, *exc):
        for q in self.quantizers:
            q.enabled = True


def _search_entries(inputs, max_tokens: int) -> list[int]:
    """Indices of this rank's calibration batches that search: batches spread over the whole
    set (all ranks' batches, by global index), about ``max_tokens`` tokens in all."""
    first, n = global_offset(len(inputs.entries))
    per = max(1, inputs.hidden(0).shape[:-1].numel())
    k = min(n, max(1, -(-max_tokens // per)))
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [0]
    return local_indices(picks, first, len(inputs.entries))


def _input_key(rel: str, groups: list[Group]) -> str:
    """Linears of one group share an input: their statistics are collected once."""
    for g in groups:
        if rel in g.linears:
            return g.linears[0]
    return rel


@dataclass
class _Capture:
    absmean: dict   # input key -> mean |x| per channel
    gram: dict      # input key -> [nb, width, width] (None when no clip is needed)
    blocks: dict    # block name -> [(args, kwargs, reference output)]
    scale: dict     # input key -> folded scale
    hessian: dict   # input key -> HessianAccumulator (GPTQ only)

    def clear(self):
        self.blocks.clear()
        self.gram.clear()
        self.hessian.clear()


class _InputStats:
    def __init__(self, width):
        self.width, self.abssum, self.count, self.gram = width, 0.0, 0, 0.0

    def __call__(self, module, args, kwargs=None):
        x = args[0].detach().float()
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise CalibrationError("NaN/Inf in activations during AWQ calibration; run in "
                                   "float32/bfloat16 or check the inputs")
        # per-batch float32 partials summed in float64: the sum does not depend on the order
        # of batches or ranks, so N ranks reproduce one process exactly
        self.abssum = self.abssum + x.abs().sum(0).double()
        self.count += x.shape[0]
        if self.width:
            self.gram = self.gram + S.block_gram(x, self.width).double()

    def absmean(self) -> torch.Tensor:
        """Mean |x| per channel over every rank's tokens (all-reduced under torch.distributed)."""
        count = reduce_sum(float(self.count))
        return reduce_sum_(torch.as_tensor(self.abssum, dtype=torch.float64)).float() / max(count, 1)


@torch.no_grad()
def _capture(layer, inputs, groups, linears, subset, device, hessians: bool = False) -> _Capture:
    """One replay of the float layer: input statistics (and with ``hessians`` each input's
    ``X^T X`` for GPTQ) and the search batches' block I/O."""
    keys = {}
    for rel in linears:
        keys.setdefault(_input_key(rel, groups), []).append(rel)
    for g in groups:
        keys.setdefault(g.linears[0], list(g.linears))
    stats, handles, blocks, hess = {}, [], {g.block: [] for g in groups}, {}
    holder = {}   # an input several keys read (MoE experts' gate/up) -> the key holding its stats
    for key, members in keys.items():
        shared = shared_input_key(layer, key)
        if shared in holder:   # one set of statistics (and Hessian) for all of them
            stats[key] = stats[holder[shared]]
            if holder[shared] in hess:
                hess[key] = hess[holder[shared]]
            continue
        if shared is not None:
            holder[shared] = key
        quant = [linears[n] for n in members if n in linears]
        width = S.block_width(quant[0].weight_quantizer.spec, quant[0].in_features_2d) if (
            quant and quant[0].weight_quantizer.spec.granularity != "per_tensor") else 0
        stats[key] = _InputStats(width)
        handles.append(layer.get_submodule(key).register_forward_pre_hook(stats[key]))
        if hessians and width:
            hess[key] = HessianAccumulator(quant[0].in_features_2d, device=device,
                                           exact=True)
            handles.append(layer.get_submodule(key).register_forward_pre_hook(
                lambda m, args, acc=hess[key]: acc.add(args[0])))
    active = [False]
    for block in blocks:
        def keep(module, args, kwargs, out, block=block):
            if active[0]:
                blocks[block].append((args, kwargs, _first(out)))
        handles.append(layer.get_submodule(block).register_forward_hook(keep, with_kwargs=True))
    try:
        for j, (args, kwargs) in enumerate(inputs.entries):
            active[0] = j in subset
            layer(*_to(args, device), **_to(kwargs, device))
    finally:
        for h in handles:
            h.remove()
    unique = list({id(st): st for st in stats.values()}.values())   # shared sets: reduce once
    seen = {id(st): reduce_sum(float(st.count)) > 0 for st in unique}
    for k in [k for k, st in stats.items() if not seen[id(st)]]:   # never called by the layer
        del stats[k]
        hess.pop(k, None)
    unique = [st for st in unique if seen[id(st)]]
    absmean = {id(st): st.absmean() for st in unique}
    gram = {id(st): reduce_sum_(st.gram).float() for st in unique if st.width}
    return _Capture({k: absmean[id(st)] for k, st in stats.items()},
                    {k: gram[id(st)] for k, st in stats.items() if st.width}, blocks, {}, hess)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device):
    from ..calib.sequential import _move

    return _move(obj, device)


@torch.no_grad()
def _search_group(layer, group: Group, linears: dict, cap: _Capture, algo: AWQConfig):
    quant = {n: linears[n] for n in group.linears if n in linears}
    spec = next(iter(quant.values())).weight_quantizer.spec
    weights = {n: m.weight_2d().detach().clone() for n, m in quant.items()}
    w_mag = S.weight_magnitude(list(weights.values()), spec) if algo.duo_scaling else None
    cands = tie_scale(layer, group, S.candidate_scales(cap.absmean[group.linears[0]], w_mag,
                                                       algo.n_grid))
    block = layer.get_submodule(group.block)
    batches = cap.blocks[group.block]

    def loss(s):
        for n, m in quant.items():
            m.weight.data.copy_(m.weight_from_2d(S.scaled_weight(weights[n], s, spec)))
        err = 0.0
        for args, kwargs, ref in batches:
            err += (_first(block(*args, **kwargs)) - ref).float().pow(2).mean().item()
        return reduce_sum(err)  # every rank scores the union of the ranks' search batches

    try:
        s, losses = S.best_scale(cands, loss)
    finally:
        for n, m in quant.items():
            m.weight.data.copy_(m.weight_from_2d(weights[n]))
    logger.debug("%s: best of %d scales, loss %.3g (identity %.3g)", group.block, len(cands),
                 losses.min(), losses[0])
    return s


@torch.no_grad()
def _set_clip(module, cap: _Capture, key: str, algo: AWQConfig) -> None:
    quantizer = module.weight_quantizer
    w = module.weight_2d().detach().float()
    if not algo.clip or key not in cap.gram:
        quantizer.init_from_weight(w)
        return
    gram = cap.gram[key]
    if key in cap.scale:
        gram = S.scale_gram(gram, cap.scale[key].to(gram.device))
    ratios = S.clip_ratios(algo.clip_grid, algo.clip_min_ratio)
    amin, amax = S.search_clip(w, gram, quantizer.spec, ratios)
    quantizer.set_range(amax, amin)


@torch.no_grad()
def _gptq_round(linears: dict, cap: _Capture, groups, algo: AWQConfig) -> None:
    """GPTQ-round every weight onto its set range, the linears sharing an input at once (their
    rows stacked: one Hessian, one factorisation). Every rank holds the same reduced Hessian
    and weights and computes the same result."""
    by_key: dict[str, list] = {}
    for rel, m in linears.items():
        by_key.setdefault(_input_key(rel, groups), []).append(m)
    for key, mods in by_key.items():
        if key not in cap.hessian:
            continue
        h = cap.hessian.pop(key).hessian().float()   # (the accumulator is freed here)
        if key in cap.scale:  # the Hessian of x / s
            inv = 1.0 / cap.scale[key].to(h.device, h.dtype)
            h.mul_(inv[:, None]).mul_(inv[None, :])
        gptq_round_linears(mods, h, algo.gptq_damp, consume=True)
        del h


# --- artefacts: scales and ranges, reusable without calibration ---

def _ranges(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if _weight_quantized(m) and m.weight_quantizer.amax is not None:
            out[f"{name}.amax"] = m.weight_quantizer.amax
            if m.weight_quantizer.amin is not None:
                out[f"{name}.amin"] = m.weight_quantizer.amin
    return out


def save_artefacts(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the AWQ scales (per layer and group) and weight ranges of ``model`` to ``directory``."""
    from safetensors.torch import save_file

    scales = getattr(model, "_awq_scales", None)
    if scales is None:
        raise ValueError("this model holds no AWQ search results; run quantize(..., 'int4_awq')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"scale::{k}": v for k, v in scales.items()}
    tensors.update({f"range::{k}": v.cpu() for k, v in _ranges(model).items()})
    if getattr(model, "_awq_gptq", False):  # GPTQ moved the weights themselves
        tensors.update({f"weight::{name}": m.weight.detach().cpu()
                        for name, m in model.named_modules() if _weight_quantized(m)})
    tmp = directory / f".{ARTEFACT_TENSORS}.{uuid.uuid4().hex}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, directory / ARTEFACT_TENSORS)
    finally:
        tmp.unlink(missing_ok=True)
    cfg = getattr(model, "_modelopt_lite", {}).get("config")
    meta = {"format_version": 1, "n_scales": len(scales), "config": cfg}
    (directory / ARTEFACT_MANIFEST).write_text(json.dumps(meta, indent=1))
    return directory


@torch.no_grad()
def apply_artefacts(model: nn.Module, directory: str | os.PathLike) -> None:
    """Fold saved scales into a freshly wrapped model and set its saved weight ranges."""
    from safetensors.torch import load_file

    from ..nn.int4_linear import int4_layers

    if int4_layers(model):
        raise ValueError("apply_artefacts: the model has deployed Int4Linear layers, whose "
                         "packed weights cannot take new scales; apply the artefacts to the "
                         "float (or fake-quant) model, then deploy()")
    tensors = load_file(str(Path(directory) / ARTEFACT_TENSORS))
    scales = {k[len("scale::"):]: v for k, v in tensors.items() if k.startswith("scale::")}
    used = 0
    for name, layer in calibration_blocks(model):
        for group in layer_groups(model, layer, kv_tied=True):  # whatever was saved
            key = f"{name}::{','.join(group.linears)}"
            if key in scales:
                s = scales[key].to(next(layer.parameters()).device)
                apply_group_scale_(layer, group, s)
                used += 1
    if used != len(scales):
        raise ValueError(f"{directory}: {len(scales) - used} saved scale(s) match no group of this "
                         "model; apply artefacts to the architecture they were made from, with "
                         "the modelopt_lite version that made them (a model type's table row "
                         "decides the groups)")
    ranges = {k[len("range::"):]: v for k, v in tensors.items() if k.startswith("range::")}
    weights = {k[len("weight::"):]: v for k, v in tensors.items() if k.startswith("weight::")}
    for name, m in model.named_modules():
        if name in weights:
            if weights[name].shape != m.weight.shape:
                raise ValueError(f"{directory}: saved weight of {name} has shape "
                                 f"{tuple(weights[name].shape)}, the model's is "
                                 f"{tuple(m.weight.shape)}")
            m.weight.data.copy_(weights[name].to(m.weight.device, m.weight.dtype))
        if _weight_quantized(m) and f"{name}.amax" in ranges:
            amin = ranges.get(f"{name}.amin")
            m.weight_quantizer.set_range(ranges[f"{name}.amax"].to(m.weight.device),
                                         None if amin is None else amin.to(m.weight.device))
    model._awq_scales = scales
    model._awq_gptq = bool(weights)
