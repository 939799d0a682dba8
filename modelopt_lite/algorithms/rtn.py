"""Round-to-nearest (max calibration): weight ranges from the weights, static activation
ranges from calibration data.

Example::

    model = quantize(model, "w8a8", calib=texts, tokenizer=tok)
"""

from __future__ import annotations

import logging

from ..layers import quant_modules
from ..nn.tensor_quantizer import CalibrationError
from . import register_applier

logger = logging.getLogger(__name__)


def static_input_quantizers(model):
    return [m.input_quantizer for _, m in quant_modules(model)
            if m.input_quantizer.enabled and not m.input_quantizer.spec.dynamic]


def calibrate_activations(model, forward_loop) -> None:
    """Collect static activation ranges with ``forward_loop`` (no-op when none are static)."""
    quantizers = static_input_quantizers(model)
    if not quantizers:
        return
    if forward_loop is None:
        raise CalibrationError(
            f"{len(quantizers)} static activation quantizer(s) need calibration data "
            f"(first: {quantizers[0].name}); pass calib= or forward_loop= to quantize(), or use "
            "a dynamic activation spec")
    calibrate_quantizers(model, quantizers, forward_loop)


def calibrate_quantizers(model, quantizers, forward_loop) -> None:
    """Run ``forward_loop(model)`` once with ``quantizers`` collecting, then set their ranges,
    each on its layer's device (the pass may have run a layer elsewhere: a layer streamer or
    accelerate's offload hooks move it for its turn and back)."""
    for q in quantizers:
        q.start_calibration()
    try:
        forward_loop(model)
        homes = _homes(model, quantizers)
        for q in quantizers:   # a quantizer no activation reached keeps no range; quantize()
            q.finish_calibration(required=False)   # leaves its never-called layer in float
            if homes.get(id(q)) is not None:
                q.to(homes[id(q)])
    finally:
        for q in quantizers:
            q._calibrator = None


def _homes(model, quantizers) -> dict:
    """id(quantizer) -> the device its layer's weight lives on (for a weight accelerate
    offloads: where accelerate runs the layer); absent when neither is known."""
    from ..calib.offload import offloaded_weights

    wanted = {id(q) for q in quantizers}
    store, out = offloaded_weights(model), {}
    for name, m in quant_modules(model):
        for q in (m.input_quantizer, m.weight_quantizer):
            if id(q) not in wanted:
                continue
            home = m.weight.device if not m.weight.is_meta else (
                store.home_device(name) if store is not None else None)
            if home is not None:
                out[id(q)] = home
    return out


@register_applier("max")
def apply(model, config, forward_loop=None, progress=True) -> None:
    calibrate_activations(model, forward_loop)
