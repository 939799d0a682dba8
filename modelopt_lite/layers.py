"""Which layers a config quantizes, which it skips and why; inserting the quantizers.

Planning is separate from changing the model: every check runs before any module is wrapped,
so a bad config or model raises with the model untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig, QuantizerSpec
from .nn.quant_modules import CONV_TYPES, is_quantized, quant_class_for, wrap_module

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LayerSelectionError(ValueError):
    """The config selects no layer, or a layer it selects cannot be quantized as asked."""


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    weight_spec: QuantizerSpec | None
    input_spec: QuantizerSpec | None
    skipped: str | None = None  # the reason, when skipped
    note: str | None = None

    def record(self) -> dict:
        spec = lambda s: None if s is None else dataclasses.asdict(s)  # noqa: E731
        return {"name": self.name, "type": type(self.module).__name__,
                "weight_shape": list(_weight_2d_shape(self.module)),
                "weight": spec(self.weight_spec), "input": spec(self.input_spec),
                "skipped": self.skipped, "note": self.note,
                "weight_sqnr_db": _finite(getattr(self.module, "_weight_sqnr_db", None))}


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def _weight_2d_shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    if type(module).__name__.endswith("Conv1D"):
        return (w.shape[1], w.shape[0])
    return (w.shape[0], w[0].numel())


MIXER_CONV = ("causal depthwise Conv1d of a recurrent sequence mixer (Mamba, gated "
              "DeltaNet, short-conv): its weight is also read directly when decoding and its "
              "error feeds the recurrence, so it stays in float (name it in targets to "
              "quantize it)")


INT4_CONV = ("a convolution under INT4 block weights, which are for linear layers (the W4A16 "
             "kernels and TensorRT's INT4 path are MatMul; a conv would lose accuracy and gain "
             "nothing): it stays in float (name it in targets to fake-quantize it, or quantize "
             "convs with an INT8 preset)")


def is_mixer_conv(module: nn.Module) -> bool:
    """A causal depthwise ``Conv1d`` (one filter per channel, left padding ``kernel - 1``):
    the short convolution in front of a state-space / linear-attention recurrence (Mamba's
    and Jamba's ``mixer.conv1d``, Qwen3-Next's ``linear_attn.conv1d``, LFM2's ``conv``,
    RecurrentGemma's ``conv_1d``), which nvidia-modelopt also keeps in float. A conformer's
    depthwise conv is centred ("same" padding), not causal, and is quantized as usual."""
    if not isinstance(module, nn.Conv1d) or isinstance(module.padding, str):
        return False
    k, d = module.kernel_size[0], module.dilation[0]
    return (k > 1 and module.groups == module.in_channels == module.out_channels
            and module.padding[0] == d * (k - 1))


def _type_matches(module: nn.Module, types: tuple[str, ...]) -> bool:
    names = {cls.__name__ for cls in type(module).__mro__}
    return bool(names & set(types)) and quant_class_for(type(module)) is not None


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _explicit(name: str, patterns) -> bool:
    return name in patterns


def plan_layers(model: nn.Module, config: QuantConfig) -> list[LayerPlan]:
    """Decide, for every candidate layer, its specs or the reason it is skipped."""
    from .models import other_modalities
    from .moe import router_linears

    plans, routers = [], router_linears(model)
    towers = other_modalities(model, config.targets)
    for name, module in model.named_modules():
        if not name or is_quantized(module) or not _type_matches(module, config.module_types):
            continue
        if not _matches(name, config.targets) or _matches(name, config.exclude):
            continue
        if name in routers and not _explicit(name, config.targets):
            plans.append(LayerPlan(name, module, None, None,
                                   skipped="MoE router: routing stays in float"))
            continue
        if is_mixer_conv(module) and not _explicit(name, config.targets):
            plans.append(LayerPlan(name, module, None, None, skipped=MIXER_CONV))
            continue
        if towers and towers(name):
            plans.append(LayerPlan(name, module, None, None, skipped=towers.reason))
            continue
        plans.append(_plan_one(name, module, config))
    if not plans:
        raise LayerSelectionError(_no_layers_message(model, config))
    # of the layers nothing else rules out (routers, other modalities, custom forwards)
    eligible = [p for p in plans if not p.skipped or p.skipped.startswith(_INDIVISIBLE)]
    skipped = [p for p in eligible if p.skipped]
    if 2 * len(skipped) > len(eligible):   # more than half, or all
        dims = sorted({_weight_2d_shape(p.module)[1] for p in skipped})
        fits = [b for b in (128, 64, 32, 16, 8) if all(d % b == 0 for d in dims)]
        fix = (f"block {fits[0]} divides them all" if fits else
               "no block size from 8 to 128 divides them all")
        text = (f"{len(skipped)} of {len(eligible)} matched layers would be skipped (first: "
                f"{skipped[0].name}: {skipped[0].skipped}; input dims {dims[:6]}): {fix}, or "
                "set on_indivisible='per_channel'")
        if len(skipped) == len(eligible):
            raise LayerSelectionError(f"nothing to quantize: {text}")
        log.warning(text)
    if all(p.skipped for p in plans):
        raise LayerSelectionError(
            f"nothing to quantize: all {len(plans)} matched layers are skipped (first: "
            f"{plans[0].name}: {plans[0].skipped}); see the reason, or name layers in targets")
    return plans


_INDIVISIBLE = "in_features"


def _plan_one(name: str, module: nn.Module, config: QuantConfig) -> LayerPlan:
    if module.weight.dtype not in SUPPORTED_DTYPES:
        raise LayerSelectionError(
            f"{name}: weight dtype {module.weight.dtype} is not supported; quantize a model in "
            "float32, float16 or bfloat16 (e.g. model.float() first)")
    plan = LayerPlan(name, module, config.weight, config.input)
    custom = _custom_forward(module)
    if custom is not None:
        if _explicit(name, config.targets):
            raise LayerSelectionError(
                f"{name}: {custom}. Fix: quantize the linears it calls instead, or leave it out")
        plan.skipped = custom
        return plan
    w = config.weight
    if (w is not None and w.num_bits == 4 and w.granularity == "per_block"
            and isinstance(module, CONV_TYPES) and not _explicit(name, config.targets)):
        plan.skipped = INT4_CONV
        return plan
    if w is None or w.granularity != "per_block":
        return plan
    in_dim = _weight_2d_shape(module)[1]
    if in_dim % w.block_size == 0:
        return plan
    reason = f"{_INDIVISIBLE} {in_dim} is not divisible by block {w.block_size}"
    # a layer named in targets is not skipped quietly; per_channel still serves it
    if config.on_indivisible == "error" or (_explicit(name, config.targets)
                                            and config.on_indivisible == "skip"):
        raise LayerSelectionError(
            f"{name}: {reason}. Fix: choose a block size that divides {in_dim}, exclude the "
            "layer, or set on_indivisible='skip' or 'per_channel'")
    if config.on_indivisible == "per_channel":
        plan.weight_spec = dataclasses.replace(w, granularity="per_channel", block_size=None)
        plan.note = f"{reason}: per-channel instead"
        return plan
    plan.skipped = reason
    return plan


def _custom_forward(module: nn.Module) -> str | None:
    """Why a subclass of Linear / a conv with a ``forward`` of its own cannot be wrapped (the
    fake-quant class's forward would replace it), or None. A Linear subclass whose forward
    is still ``x W^T + b`` (Falcon's ``FalconLinear``) is fine: a probe of the instance on a
    random input decides; a router returning top-k ids and weights, or a layer with an
    adapter, is not."""
    for base in (nn.Linear, *CONV_TYPES):
        if not isinstance(module, base) or type(module).forward is base.forward:
            continue
        if base is nn.Linear and _acts_as_linear(module):
            return None
        return (f"{type(module).__name__} subclasses {base.__name__} with a forward of its "
                "own, which a fake-quant wrapper would replace")
    return None


_PROBED_META: dict[tuple, bool] = {}
_UPCAST_LIMIT = 1 << 26   # parameters up to this many elements are probed in float32


@torch.no_grad()
def _acts_as_linear(module: nn.Linear) -> bool:
    """Whether this instance's own forward computes ``x W^T + b``: one call of the class's
    forward (no hooks, eval mode) on three random rows, in float32 where the parameters are
    small enough to copy, on random float32 stand-ins when they are on the meta device."""
    params = dict(module.named_parameters())
    meta = any(p.is_meta for p in params.values())
    key = (type(module), tuple((n, tuple(p.shape)) for n, p in params.items()))
    if meta and key in _PROBED_META:   # random stand-ins: the answer is the class's
        return _PROBED_META[key]
    gen = torch.Generator().manual_seed(0)
    if meta:
        values = {n: torch.randn(p.shape, generator=gen, device="cpu") for n, p in params.items()}
    elif sum(p.numel() for p in params.values()) <= _UPCAST_LIMIT:
        values = {n: p.detach().float() for n, p in params.items()}
    else:
        values = None   # a huge layer: its own dtype, a looser tolerance
    weight = values["weight"] if values else module.weight
    x = torch.randn(3, weight.shape[1], generator=gen, device="cpu").to(weight)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with (torch.nn.utils.stateless._reparametrize_module(module, values) if values
              else contextlib.nullcontext()):
            out = type(module).forward(module, x)
            ref = torch.nn.functional.linear(x, module.weight, module.bias)
    except Exception:  # noqa: BLE001 - any failure means: not a drop-in linear
        out = ref = None
    finally:
        for m, mode in modes:
            m.training = mode
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    ok = (isinstance(out, torch.Tensor) and out.shape == ref.shape and bool(torch.allclose(
        out.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()))))
    if meta:
        _PROBED_META[key] = ok
    return ok


def _no_layers_message(model: nn.Module, config: QuantConfig) -> str:
    seen = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if n and quant_class_for(type(m)) is not None][:8]
    return ("the config matches no layer of this model: targets="
            f"{list(config.targets)}, exclude={list(config.exclude)}, "
            f"module_types={list(config.module_types)}. Quantizable layers here: "
            f"{seen or 'none (no Linear, Conv1d, Conv2d, Conv3d or Conv1D)'}")


def insert_quantizers(plans: list[LayerPlan]) -> None:
    """Wrap every planned (not skipped) layer; ranges of weights come from the weights."""
    for plan in plans:
        if plan.skipped:
            continue
        module = wrap_module(plan.module, plan.weight_spec, plan.input_spec, plan.name)
        module.__dict__.pop("_weight_sqnr_db", None)  # a GPTQ record of an earlier quantize()
        if plan.weight_spec is not None:
            module.weight_quantizer.init_from_weight(module.weight_2d())


def quant_modules(model: nn.Module):
    """(name, module) for every fake-quant layer of a model."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]
