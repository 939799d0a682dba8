"""The front door: ``quantize``, ``deploy`` and friends. Thin: the work lives one layer down.

Example::

    import modelopt_lite as mtl
    model = mtl.quantize(model, "int4_weight_only", calib=texts, tokenizer=tokenizer)
    mtl.print_summary(model)
    mtl.save(model, "out/")
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from .algorithms import get_applier
from .calib.offload import offload_store
from .calib.runner import resolve_forward_loop
from .config import QuantConfig, resolve_config
from .layers import LayerPlan, insert_quantizers, plan_layers, quant_modules
from .moe import all_experts_calibrate
from .nn.quant_modules import CONV_TYPES, unwrap_module
from .rewrites import flags, rewrite, undo

logger = logging.getLogger(__name__)


class AlreadyQuantizedError(ValueError):
    """quantize() was called on a model that already holds fake-quant layers."""


def quantize(model: nn.Module, config="int8_weight_only", *, calib=None, forward_loop=None,
             tokenizer=None, n_samples: int = 32, seq_len: int = 512, batch_size: int = 1,
             seed: int = 0, progress: bool = True) -> nn.Module:
    """Insert fake quantizers into ``model`` as ``config`` says, calibrate, and return it.

    ``config``: a preset name (``"int8_weight_only"``, ``"int4_weight_only"``, ``"w8a8"``,
    ...), a :class:`QuantConfig`, a dict, or a JSON/YAML path. Calibration data comes from
    ``calib`` (strings, a text file, a ``datasets.Dataset``, a DataLoader or a token tensor;
    strings need ``tokenizer``) or from ``forward_loop(model)``. ``n_samples`` windows of
    ``seq_len`` tokens are drawn from texts and 1-D token streams, and cut from batches; a 2-D
    ``[rows, tokens]`` tensor is used whole, as given. Models that read other inputs take
    them as they are: a float tensor of images (split into ``batch_size`` rows), a dict such
    as a processor's ``{"pixel_values": ...}``, a list or DataLoader of such batches or of
    ``(inputs, labels)``, or a ``datasets.Dataset`` of such columns (the first ``n_samples``
    rows; label columns are left out). Every check runs before the
    model changes; on failure the model is restored to float.

    Mixture-of-experts models whose experts are fused 3-D weights (transformers 5's Mixtral,
    Qwen-MoE, DeepSeek, GPT-OSS, ...) get one ``nn.Linear`` per expert projection first
    (:func:`modelopt_lite.moe.unfuse_experts`, which leaves the float function unchanged), so
    every expert is quantized. During calibration every expert runs on every token (the
    model's outputs still come from the routed experts only), so each expert's statistics,
    rarely routed ones included, come from the whole calibration set. Likewise every
    ``nn.MultiheadAttention`` becomes q/k/v/out ``nn.Linear`` layers
    (:func:`modelopt_lite.attention.unpack_attention`, same function), whose packed weights
    would otherwise be read around any quantizer.
    """
    cfg = resolve_config(config)
    if quant_modules(model):
        raise AlreadyQuantizedError("this model already has fake-quant layers; quantize a fresh "
                                    "float model (or call modelopt_lite.unquantize(model) first)")
    _check_adapters(model, cfg)
    offloaded = offload_store(model)   # accelerate's CPU / disk offload, checked first
    rewritten = rewrite(model)   # fused MoE experts, nn.MultiheadAttention -> nn.Linear
    try:
        plans = plan_layers(model, cfg)
        _check_parametrized(plans, cfg)
        loop = resolve_forward_loop(model, calib, forward_loop, tokenizer, n_samples, seq_len,
                                    batch_size, seed, progress)
        apply = get_applier(cfg.algorithm.name)
        insert_quantizers(plans)
        with _streaming_offloaded(model, offloaded, plans), all_experts_calibrate(model), \
                _CallTracker(model, plans) as tracker:
            apply(model, cfg, loop, progress)   # (MoE: every expert sees every token)
    except BaseException:
        _remove_quantizers(model)
        undo(model, rewritten)   # the model as it came, fused experts included
        raise
    _leave_uncalled_in_float(tracker)
    _record(model, cfg, plans)
    logger.info("quantized %d layer(s), skipped %d", sum(not p.skipped for p in plans),
                sum(bool(p.skipped) for p in plans))
    return model


def unmerged_adapters(model: nn.Module) -> list[str]:
    """Names of the layers holding unmerged PEFT adapters (LoRA and kin: a ``base_layer``
    beside adapter branches that read the same input), enabled or not."""
    return [name for name, m in model.named_modules()
            if hasattr(m, "base_layer") and not getattr(m, "merged", True)
            and any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.")
                    for c in type(m).__mro__)]   # (disabled ones too: they come back)


_WRITES_WEIGHTS = ("awq", "smoothquant")   # scale / fold / GPTQ-round weights in place


def _refuse(cfg: QuantConfig, names: list[str], problem: str) -> None:
    """Refuse ``names`` (the first named, the rest counted) for a weight-writing algorithm."""
    if names and cfg.algorithm.name in _WRITES_WEIGHTS:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(f"{names[0]}{more}{problem.format(algo=cfg.algorithm.name)}")


def _check_adapters(model: nn.Module, cfg: QuantConfig) -> None:
    """AWQ and SmoothQuant fold scales into the layers that feed a linear; an unmerged
    adapter reads the same input through its own branch, which the fold would change."""
    if cfg.algorithm.name not in _WRITES_WEIGHTS:
        return
    _refuse(cfg, unmerged_adapters(model),
            " holds an unmerged PEFT adapter: "
            "{algo} folds scales into the layers feeding the base linear, and "
            "the adapter branch reads that input too, so the model's function would change. "
            "Fix: merge the adapters first (model = model.merge_and_unload()), or use a "
            "preset without folds (int4_weight_only, w8a8)")


def _check_parametrized(plans: list[LayerPlan], cfg: QuantConfig) -> None:
    """AWQ and SmoothQuant scale and GPTQ-round a linear's weight in place; a weight computed
    by a parametrization (weight_norm, spectral_norm) is recomputed from its source tensors
    on every read, so those writes would be lost and the model's function would change.
    (Convolutions are not scaled or rounded: they keep max ranges.)"""
    from torch.nn.utils import parametrize

    _refuse(cfg, [p.name for p in plans if not p.skipped and not isinstance(p.module, CONV_TYPES)
                  and parametrize.is_parametrized(p.module, "weight")],
            ": its weight is computed by a parametrization (e.g. weight_norm), "
            "and {algo} writes scaled and rounded values into the weight, which "
            "a parametrization would discard. Fix: remove it first (torch.nn.utils.parametrize"
            ".remove_parametrizations(layer, 'weight')), exclude the layer, or use a preset "
            "without weight updates (int4_weight_only, w8a8)")


@contextmanager
def _streaming_offloaded(model: nn.Module, weights, plans: list[LayerPlan]):
    """An accelerate-offloaded model is calibrated one layer at a time, each loaded from the
    offload store and written back processed (:mod:`modelopt_lite.calib.offload`). Weight
    quantizers inserted on ``meta`` weights take their ranges from the store first, as they
    do from resident weights when inserted."""
    if weights is None:
        yield
        return
    from .calib.offload import offloaded_streaming
    from .calib.streaming import _init_weight_ranges

    for p in plans:
        amax = None if p.skipped else getattr(p.module.weight_quantizer, "amax", None)
        if amax is not None and amax.is_meta:
            with weights.onloaded(p.name, p.module):
                _init_weight_ranges(p.module)
    with offloaded_streaming(model, weights):
        yield


class _CallTracker:
    """Context: which planned layers' forward ran during calibration, and which passes ran to
    their end: a whole-model forward (max calibration) or a decoder layer's (the layer-by-layer
    replays of AWQ / SmoothQuant)."""

    def __init__(self, model: nn.Module, plans: list[LayerPlan]):
        from .models import calibration_blocks

        self.model, self.plans = model, [p for p in plans if not p.skipped]
        self.layers = {name: block for name, block in calibration_blocks(model) if name}
        self.names: set[str] = set()
        self.whole = False
        self.layers_done: set[str] = set()

    def __enter__(self):
        self.handles = [p.module.register_forward_pre_hook(
            lambda m, args, name=p.name: self.names.add(name)) for p in self.plans]
        self.handles.append(self.model.register_forward_hook(   # None: the layer-0 capture
            lambda m, args, out: out is not None and setattr(self, "whole", True)))
        self.handles += [layer.register_forward_hook(
            lambda *a, name=name: self.layers_done.add(name))
            for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def uncalled(self) -> list[LayerPlan]:
        """Planned layers a completed pass should have called but did not, on every rank."""
        from .calib.distributed import reduce_sum_  # noqa: PLC0415 - calib imports api users

        def expected(name: str) -> bool:
            if self.whole:
                return True
            # inside a replayed layer that ran; outside the decoder layers no pass reached it
            return any(name.startswith(layer + ".") for layer in self.layers_done)

        flags = torch.tensor([float(p.name in self.names or not expected(p.name))
                              for p in self.plans], dtype=torch.float64)
        reduce_sum_(flags)   # called (or not expected) on any rank counts
        return [p for p, f in zip(self.plans, flags.tolist()) if f == 0]


def _leave_uncalled_in_float(tracker: _CallTracker) -> None:
    """Layers a completed calibration pass never called (Mamba's ``dt_proj``, whose weight the
    mixer reads directly; cross-attention fed no encoder states) have no statistics, and a
    fake-quant forward that never runs would not quantize them anyway: unwrap them and say
    why. Layers no pass was meant to reach (after the decoder layers under a layer-by-layer
    weight-only algorithm, or when nothing ran) keep their quantizers."""
    uncalled = tracker.uncalled()
    for p in uncalled:
        _remove_one(p.module)
        p.skipped = ("not called by the model's forward on the calibration data (its weight "
                     "is read directly, or it needs inputs the data lacks): left in float")
    if uncalled:
        logger.warning("%d layer(s) were never called during calibration and stay in float "
                       "(first: %s); see print_summary", len(uncalled), uncalled[0].name)


def _record(model: nn.Module, cfg: QuantConfig, plans: list[LayerPlan]) -> None:
    kept = {k: v for k, v in (getattr(model, "_modelopt_lite", None) or {}).items()
            if k == "sparsity"}  # masks recorded by sparsify() stay with the model
    model._modelopt_lite = {**kept, "config": cfg.to_dict(), "layers": [p.record() for p in plans],
                            **flags(model)}


def unquantize(model: nn.Module) -> nn.Module:
    """Remove every fake quantizer; the float function stays: smoothing folds remain, and an
    unfolded smoothing multiply (``pre_quant_scale``) and an online input rotation are folded
    into the weight's input columns. ``nn.MultiheadAttention`` modules quantize() unpacked
    are packed back (unless the model is also sparsified, whose q/k/v masks they hold), so
    the model's state dict has its own keys again; unfused MoE experts stay per-expert
    (:func:`modelopt_lite.moe.fuse_experts` puts them back)."""
    from .nn.int4_linear import int4_layers

    deployed = list(int4_layers(model))
    if deployed:   # packed INT4: the float weights are gone; refuse before changing anything
        raise ValueError(f"{len(deployed)} layer(s) were deployed as packed INT4 (first: "
                         f"{deployed[0]}), whose float weights are gone; unquantize works "
                         "before deploy(): reload the float model (and modelopt_lite.load a "
                         "checkpoint onto it) instead")
    _remove_quantizers(model)
    if not getattr(model, "_modelopt_lite", None):   # no sparsity records hold the linears
        from .attention import pack_attention

        pack_attention(model)
    return model


def _remove_quantizers(model: nn.Module) -> nn.Module:
    """:func:`unquantize` without its check (quantize()'s restore on failure). A layer whose
    weight accelerate offloads is loaded from the offload store for its folds and written
    back."""
    from .calib.offload import at_hand, offloaded_weights

    store = offloaded_weights(model)
    for name, module in quant_modules(model):
        with at_hand(store if _folds(module) else None, name, module, write_back=True):
            _remove_one(module)
    if hasattr(model, "_modelopt_lite"):
        sparsity = model._modelopt_lite.get("sparsity")
        del model._modelopt_lite
        if sparsity:  # the weight_mask buffers are still there
            model._modelopt_lite = {"sparsity": sparsity, **flags(model)}
    return model


def _folds(module: nn.Module) -> bool:
    """Whether unwrapping ``module`` changes its weight (an input multiply or rotation)."""
    iq = module.input_quantizer
    return iq.pre_quant_scale is not None or getattr(iq, "rotation", None) is not None


def _remove_one(module: nn.Module) -> None:
    """Unwrap one fake-quant layer, folding an explicit input multiply and an online rotation
    into its weight so the float function stays."""
    from .models import scale_linear_inputs_, unrotate_linear_input_

    pqs = module.input_quantizer.pre_quant_scale
    if pqs is not None and module.weight.dim() == 2:
        scale_linear_inputs_(module, pqs)
    if getattr(module.input_quantizer, "rotation", None) is not None:
        unrotate_linear_input_(module)
    unwrap_module(module)


def deploy(model: nn.Module) -> nn.Module:
    """Swap per-block INT4 fake-quant layers for kernel-backed ``Int4Linear`` layers."""
    from .nn.int4_linear import deploy_int4

    return deploy_int4(model)
