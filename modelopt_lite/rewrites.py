"""The function-preserving rewrites that :func:`~modelopt_lite.quantize` and
:func:`~modelopt_lite.sparsify` apply first, so that every projection they should reach is an
``nn.Linear``:

- fused 3-D MoE experts become one ``nn.Linear`` per expert projection
  (:func:`modelopt_lite.moe.unfuse_experts`);
- ``nn.MultiheadAttention`` becomes ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` linears
  (:func:`modelopt_lite.attention.unpack_attention`).

A model records which it holds (:data:`FLAGS`), and :func:`~modelopt_lite.load` replays them on
a fresh model before loading a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .attention import has_unpacked_attention, pack_attention, unpack_attention
from .moe import fuse_experts, has_linear_experts, prepare_experts, unfuse_experts

FLAGS = ("experts_unfused", "attention_unpacked")


@dataclass
class Rewritten:
    """The names of the modules one call rewrote (to undo exactly those)."""

    experts: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)


def rewrite(model: nn.Module) -> Rewritten:
    """Apply both rewrites in place (warning about expert weights left in a layout the MoE
    rewrite does not read); return what changed. Raises before changing anything on a fused
    experts module it cannot unfuse."""
    experts = prepare_experts(model)
    return Rewritten(experts, unpack_attention(model))


def undo(model: nn.Module, done: Rewritten) -> None:
    """Put back the modules ``done`` names (their linears must be float again)."""
    fuse_experts(model, done.experts)
    pack_attention(model, done.attention)


def flags(model: nn.Module) -> dict[str, bool]:
    """The :data:`FLAGS` that hold for ``model`` now, for its ``_modelopt_lite`` record."""
    held = {"experts_unfused": has_linear_experts(model),
            "attention_unpacked": has_unpacked_attention(model)}
    return {k: True for k, v in held.items() if v}


def replay(model: nn.Module, record: dict) -> Rewritten:
    """The rewrites a saved record says its model held, applied to ``model``."""
    experts = unfuse_experts(model) if record.get("experts_unfused") else []
    attention = unpack_attention(model) if record.get("attention_unpacked") else []
    return Rewritten(experts, attention)
