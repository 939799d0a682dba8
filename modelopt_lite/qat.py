"""Quantization-aware training: ``prepare_qat`` -> ordinary training -> ``convert``.

QAT trains through the same :class:`~modelopt_lite.nn.TensorQuantizer` and fake-quant
function as PTQ, so what training sees is what ``save``/``export``/``deploy`` see.

* Weight ranges follow the moving weights by default (``weight_range="dynamic"``: each step
  the range is recomputed from the current weight); ``"fixed"`` keeps the PTQ range (e.g.
  AWQ's clipped ranges).
* ``lsq=True`` learns the ranges (weights and static activations): ``amax`` becomes a
  parameter whose gradient follows LSQ (Esser et al. 2020), scaled by
  ``g = 1 / sqrt(n * qmax)`` with ``n`` the number of elements sharing one scale (weights) or
  the feature count (activations). LSQ implies the clipped straight-through estimator.
* ``freeze_after=N`` fixes every range after N optimizer steps.
* ``convert`` turns the trained model back into a plain PTQ model (buffers, fixed ranges).

Example::

    model = prepare_qat(model, "int4_weight_only_sym", qat=QATConfig(lsq=True))
    losses = fit(model, batches, torch.optim.AdamW(model.parameters(), 1e-5), steps=200)
    model = convert(model)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from .nn.tensor_quantizer import TensorQuantizer
from .plugins.masks import apply_masks_, mask_grads_

logger = logging.getLogger(__name__)

WEIGHT_RANGES = ("dynamic", "fixed")
RANGE_KEYS = ("amax", "amin")


@dataclass(frozen=True)
class QATConfig:
    """How ranges behave during QAT (see the module docstring)."""

    lsq: bool = False
    clip_grad: bool = False
    freeze_after: int | None = None
    weight_range: str = "dynamic"

    def __post_init__(self):
        if self.weight_range not in WEIGHT_RANGES:
            raise ConfigError(f"weight_range={self.weight_range!r} is not allowed; choose one "
                              f"of {list(WEIGHT_RANGES)}")
        if self.freeze_after is not None and self.freeze_after < 0:
            raise ConfigError(f"freeze_after must be >= 0 steps, got {self.freeze_after}")


def grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``g`` (LSQ's gradient scaling)."""
    scaled = t * g
    return t.detach() + (scaled - scaled.detach())


class LearnedRangeQuantizer(TensorQuantizer):
    """A TensorQuantizer whose static range is a parameter trained with LSQ gradients."""

    lsq_g: float = 1.0

    def _range_for(self, x):
        amin, amax = super()._range_for(x)
        if self.spec.dynamic:
            return amin, amax
        g = self.lsq_g
        return (None if amin is None else grad_scale(amin, g)), grad_scale(amax, g)

    def set_range(self, amax, amin=None):
        with torch.no_grad():
            self.amax.copy_(amax)
            if amin is not None:
                self.amin.copy_(amin)


# --- quantizer modes: dynamic (amax None), fixed (buffer), learned (parameter) ---

def quantizers(model: nn.Module):
    """(name, quantizer, owning layer) for every enabled TensorQuantizer of a model."""
    out = []
    for name, module in model.named_modules():
        for attr in ("weight_quantizer", "input_quantizer"):
            q = getattr(module, attr, None)
            if isinstance(q, TensorQuantizer) and q.enabled:
                out.append((f"{name}.{attr}" if name else attr, q, module))
    return out


def mode_of(q: TensorQuantizer) -> str:
    if isinstance(q.amax, nn.Parameter):
        return "learned" if q.amax.requires_grad else "learned_frozen"
    return "dynamic" if q.amax is None else "fixed"


def make_learned(q: TensorQuantizer, g: float, trainable: bool = True) -> None:
    q.__class__ = LearnedRangeQuantizer
    q.lsq_g = g
    q.clip_grad = True
    for key in RANGE_KEYS:
        t = getattr(q, key)
        if t is not None and not isinstance(t, nn.Parameter):
            del q._buffers[key]
            setattr(q, key, nn.Parameter(t.detach().float().clone(), requires_grad=trainable))


def make_fixed(q: TensorQuantizer) -> None:
    for key in RANGE_KEYS:
        t = getattr(q, key)
        if isinstance(t, nn.Parameter):
            del q._parameters[key]
            q.register_buffer(key, t.detach().clone())
    if type(q) is LearnedRangeQuantizer:
        q.__class__ = TensorQuantizer
        del q.lsq_g


def make_dynamic(q: TensorQuantizer) -> None:
    make_fixed(q)
    q.amax = q.amin = None


def lsq_g(q: TensorQuantizer, layer: nn.Module) -> float:
    """LSQ's gradient scale 1/sqrt(n * qmax): n = elements per scale, or features for inputs."""
    w = layer.weight_2d()
    if not q.is_weight:
        n = w.shape[1]
    elif q.spec.granularity == "per_block":
        n = q.spec.block_size
    elif q.spec.granularity == "per_channel":
        n = w.shape[1]
    else:
        n = w.numel()
    return 1.0 / math.sqrt(n * q.spec.qmax)


# --- prepare / freeze / convert ---

def prepare_qat(model: nn.Module, config=None, qat: QATConfig | None = None,
                **quantize_kwargs) -> nn.Module:
    """Make ``model`` ready for QAT and return it.

    A float model is quantized first with ``quantize(model, config, **quantize_kwargs)``
    (``config`` defaults to ``"int8_weight_only"``); a model already quantized (RTN, AWQ,
    SmoothQuant) is used as it is and ``config`` must be None.
    """
    from .api import quantize
    from .layers import quant_modules

    qat = qat or QATConfig()
    if quant_modules(model):
        if config is not None:
            raise ValueError("this model is already quantized; call prepare_qat(model) without "
                             "a config, or start from a float model")
    else:
        quantize(model, config or "int8_weight_only", **quantize_kwargs)
    for _, q, layer in quantizers(model):
        _prepare_one(q, layer, qat)
    record = getattr(model, "_modelopt_lite", None) or {}
    record["qat"] = {"config": dataclasses.asdict(qat), "step": 0, "frozen": False}
    model._modelopt_lite = record
    return model


def _prepare_one(q: TensorQuantizer, layer: nn.Module, qat: QATConfig) -> None:
    q.clip_grad = qat.clip_grad
    if q.spec.dynamic:
        return
    if q.is_weight and q.amax is None:
        q.init_from_weight(layer.weight_2d())
    if qat.lsq:
        make_learned(q, lsq_g(q, layer))
    elif q.is_weight and qat.weight_range == "dynamic":
        make_dynamic(q)


def qat_record(model: nn.Module) -> dict | None:
    """The QAT state (config, step, frozen) of the model or of the sub-model that holds it."""
    for module in model.modules():
        record = getattr(module, "_modelopt_lite", None)
        if record and "qat" in record:
            return record["qat"]
    return None


def freeze_ranges(model: nn.Module) -> None:
    """Fix every range: dynamic weight ranges from the current weights, learned ones stop."""
    for _, q, layer in quantizers(model):
        if q.spec.dynamic:
            continue
        if q.amax is None and q.is_weight:
            q.init_from_weight(layer.weight_2d())
        for key in RANGE_KEYS:
            t = getattr(q, key)
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)
                t.grad = None
    record = qat_record(model)
    if record is not None:
        record["frozen"] = True
    logger.info("QAT ranges frozen")


def convert(model: nn.Module) -> nn.Module:
    """End QAT: freeze ranges and turn learned ranges back into buffers (a plain PTQ model)."""
    freeze_ranges(model)
    for _, q, _ in quantizers(model):
        make_fixed(q)
        q.clip_grad = False
    record = qat_record(model)
    if record is not None:
        record["converted"] = True
    return model


# --- training-loop hooks shared by the plain loop and the trainer callbacks ---

def before_optimizer_step(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (2:4 masks), if the model is sparsified."""
    mask_grads_(model)


def after_optimizer_step(model: nn.Module) -> None:
    """Re-apply sparsity masks, count the step, freeze ranges when ``freeze_after`` is reached."""
    apply_masks_(model)
    record = qat_record(model)
    if record is None:
        return
    record["step"] += 1
    freeze_after = record["config"].get("freeze_after")
    if freeze_after is not None and record["step"] >= freeze_after and not record["frozen"]:
        freeze_ranges(model)


# --- quantizer state for checkpoints ---

STATE_JSON = "modelopt_lite_qat.json"
STATE_TENSORS = "modelopt_lite_qat.safetensors"


def qat_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta): every quantizer's range tensors and mode, plus the QAT step record."""
    tensors, modes = {}, {}
    for name, q, _ in quantizers(model):
        modes[name] = mode_of(q)
        for key in RANGE_KEYS:
            t = getattr(q, key)
            if t is not None:
                tensors[f"{name}.{key}"] = t.detach().cpu().float().contiguous()
    return tensors, {"version": 1, "qat": qat_record(model), "modes": modes}


def load_qat_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`qat_state_dict` returned onto a model prepared the same way."""
    found = {name: (q, layer) for name, q, layer in quantizers(model)}
    missing = sorted(set(meta["modes"]) - set(found))
    if missing:
        raise ValueError(f"QAT state names quantizers this model lacks: {missing[:5]}; prepare "
                         "the model with the same config before resuming")
    for name, mode in meta["modes"].items():
        q, layer = found[name]
        _restore_one(q, layer, mode, {k: tensors.get(f"{name}.{k}") for k in RANGE_KEYS})
    record = qat_record(model)
    if record is not None and meta.get("qat"):
        record.update(meta["qat"])


def _restore_one(q, layer, mode, ranges) -> None:
    if mode.startswith("learned") and mode_of(q).startswith("learned"):
        with torch.no_grad():  # in place: an optimizer may already hold these parameters
            for key, t in ranges.items():
                if t is not None:
                    getattr(q, key).copy_(t)
                    getattr(q, key).requires_grad_(mode == "learned")
        return
    make_dynamic(q)
    if mode == "dynamic":
        return
    for key, t in ranges.items():
        if t is not None:
            q.register_buffer(key, t.to(layer.weight.device).clone())
    if mode.startswith("learned"):
        make_learned(q, lsq_g(q, layer), trainable=mode == "learned")


def save_qat_state(model: nn.Module, directory) -> None:
    """Write the quantizer state into ``directory`` (two files, each replaced atomically)."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from .io import _atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = qat_state_dict(model)
    tmp = directory / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / STATE_TENSORS)
    _atomic_write_text(directory / STATE_JSON, json.dumps(meta, indent=1))


def load_qat_state(model: nn.Module, directory) -> bool:
    """Restore the quantizer state saved in ``directory``; False when there is none."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_JSON).exists():
        return False
    meta = json.loads((directory / STATE_JSON).read_text())
    load_qat_state_dict(model, load_file(str(directory / STATE_TENSORS)), meta)
    return True
