"""Calibration algorithms, one file each, looked up by the name of their config.

Each algorithm module registers ``apply(model, config, forward_loop, progress)``, which runs
after the quantizers are inserted (weight ranges already set from the weights) and may change
weights, ranges and pre-quantization scales.
"""

from __future__ import annotations

import importlib
import logging

APPLIERS: dict = {}
_BUILTIN = ("rtn", "smoothquant", "awq")


def register_applier(name: str):
    def wrap(fn):
        APPLIERS[name] = fn
        return fn

    return wrap


def without_convs(modules: dict, who: str, instead: str) -> dict:
    """``modules`` (name -> layer) without its convolutions (Conv1d / 2d / 3d), whose input
    channels are not the input's last axis, so the per-input-channel statistics, scales and
    Hessians of AWQ, SmoothQuant and GPTQ do not apply to them; a note names them and what
    they get ``instead``."""
    from ..nn.quant_modules import CONV_TYPES

    convs = sorted(n for n, m in modules.items() if isinstance(m, CONV_TYPES))
    if convs:
        logging.getLogger(__name__).info("%s: %d conv layer(s) (%s) %s; it acts on linears "
                                         "only", who, len(convs), convs[0], instead)
    return {n: m for n, m in modules.items() if n not in convs}


def load_builtins() -> None:
    """Import the built-in algorithm modules (registers their configs, presets and appliers)."""
    for mod in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as err:  # an algorithm file not written yet
            if err.name != f"{__name__}.{mod}":
                raise


def get_applier(name: str):
    load_builtins()
    if name not in APPLIERS:
        raise KeyError(f"no algorithm registered under {name!r}; registered: {sorted(APPLIERS)}")
    return APPLIERS[name]
