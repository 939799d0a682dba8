"""Swapping modules in place, wherever a model refers to them."""

from __future__ import annotations

from torch import nn


def replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Replace every reference to a module whose ``id`` is a key of ``new`` by its value,
    inside ``model`` (a module used in several places is replaced in each by the same new
    module; the root cannot be replaced in place and is left alone)."""
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[key] = new[id(child)]
