"""Save and load quantized models as safetensors + JSON, atomically, never unpickling.

A checkpoint folder holds ``modelopt_lite.json`` (format version, config, per-layer specs and
skip reasons, the name of the tensor file) and one ``model-<id>.safetensors`` with the whole
state dict (weights as changed by smoothing folds, plus quantizer ranges and scales). The
tensor file is written first under a fresh name, then the JSON is replaced atomically, then
stale tensor files are removed: a crash at any point leaves the previous checkpoint readable.
A model saved after ``modelopt_lite.deploy`` keeps its ``Int4Linear`` layers packed (the
manifest's ``deployed`` list); ``load`` puts them back in place of the float layers.

Example::

    mtl.save(model, "out/")
    model = mtl.load(AutoModelForCausalLM.from_pretrained(...), "out/")
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from torch import nn

from .config import CONFIG_VERSION, QuantizerSpec
from .layers import quant_modules
from .nn.quant_modules import wrap_module

FORMAT_VERSION = 2   # 2: deployed Int4Linear words tile by tile (version 1's, row by row, load)
MANIFEST = "modelopt_lite.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or that this version cannot read."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without second names of shared (tied) tensors, contiguous on CPU.
    Tensors accelerate offloads (on ``meta`` in the model) are read from its offload store."""
    state = model.state_dict()
    first: dict[int, str] = {}   # a tied tensor is read once, under its first name
    for n, t in state.items():
        if t.is_meta:
            first.setdefault(id(t), n)
    offloaded = _read_offloaded(model, list(first.values()))
    seen, out = set(), {}
    for name, t in state.items():
        key = (("meta", id(t)) if t.is_meta else
               (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = (offloaded[name] if name in offloaded else t.detach().cpu()).contiguous()
    return out


def _read_offloaded(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    if not names:
        return {}
    from .calib.offload import offloaded_weights

    store = offloaded_weights(model)
    missing = [n for n in names if store is None or n not in store]
    if missing:
        raise CheckpointError(
            f"{missing[0]} (and {len(missing) - 1} more) is on the meta device with no values "
            "to save; a model streamed with offload='meta' is saved layer by layer by its "
            "sink, and a model loaded on meta needs its weights first")
    return store.read(names, "cpu")


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the quantized model to ``directory`` (created if needed) and return its path."""
    from safetensors.torch import save_file

    state = getattr(model, "_modelopt_lite", None)
    if not state:
        raise CheckpointError("this model was not quantized by modelopt_lite; nothing to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensor_name = f"model-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = directory / f".{tensor_name}.tmp"
    try:
        save_file(_unique_state(model), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / tensor_name)
    finally:
        tmp.unlink(missing_ok=True)
    if state.get("deployed"):   # the layers as they are now (a .to(torch.bfloat16) since deploy)
        from .nn.int4_linear import int4_layers

        live = int4_layers(model)
        state = dict(state, deployed=[{"name": r["name"], **live[r["name"]].spec()}
                                      if r["name"] in live else r for r in state["deployed"]])
    manifest = {"format_version": FORMAT_VERSION, "config_version": CONFIG_VERSION,
                "tensors": tensor_name, **state}
    _atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    for old in directory.glob("model-*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a modelopt_lite checkpoint")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {manifest['format_version']} is "
                              f"newer than this modelopt_lite reads ({FORMAT_VERSION}); upgrade")
    return manifest


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore a checkpoint saved by :func:`save` onto a fresh float copy of the same model."""
    from safetensors.torch import load_file

    manifest = read_manifest(directory)
    if quant_modules(model):
        raise CheckpointError("load() needs a fresh float model; this one is already quantized")
    from .rewrites import FLAGS, replay, undo

    rewritten = replay(model, manifest)   # saved with per-expert / q,k,v linears: make them here
    modules = dict(model.named_modules())
    layers = [r for r in manifest.get("layers", []) if not r["skipped"]]
    try:
        _check_layers(layers, modules)
        tensors = load_file(str(Path(directory) / manifest["tensors"]))
        _check_shapes(model, tensors, layers, modules)
    except BaseException:
        undo(model, rewritten)   # the caller's model as it came
        raise
    deployed = {rec["name"]: rec for rec in manifest.get("deployed", [])}
    for rec in layers:
        if rec["name"] in deployed:
            continue
        spec = lambda d: None if d is None else QuantizerSpec(**d)  # noqa: E731
        wrap_module(modules[rec["name"]], spec(rec["weight"]), spec(rec["input"]), rec["name"])
    _add_mask_buffers(manifest, modules, tensors)
    from .calib.offload import offloaded_weights

    store = offloaded_weights(model)   # accelerate's CPU / disk offload, if any
    _add_int4_layers(model, deployed, modules, store)
    offloaded = _load_offloaded(model, tensors, store)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in tensors.items() if k not in offloaded}, strict=False)
    if store is not None:   # ranges and masks that hooks offloading buffers look up
        store.complete(model)
    tied = {n for n in missing if n not in tensors}
    if unexpected:
        raise CheckpointError(f"checkpoint tensors not in the model: {unexpected[:5]}")
    _check_missing_are_tied(model, tied)
    model._modelopt_lite = {k: manifest[k] for k in ("config", "layers", "sparsity", "deployed",
                                                     *FLAGS) if k in manifest}
    return model


def _add_mask_buffers(manifest, modules, tensors) -> None:
    """Register the ``weight_mask`` buffers of a sparsified checkpoint so they load."""
    for rec in manifest.get("sparsity", {}).get("layers", []):
        key = f"{rec['name']}.weight_mask"
        if rec["skipped"] or key not in tensors:
            continue
        if rec["name"] not in modules:
            raise CheckpointError(f"checkpoint layer {rec['name']} is not in this model")
        modules[rec["name"]].register_buffer("weight_mask", torch.empty_like(tensors[key]))


def _add_int4_layers(model, deployed, modules, store=None) -> None:
    """Put an empty ``Int4Linear`` where the checkpoint's model had been deployed
    (``modelopt_lite.deploy`` before ``save``), on the float layer's device (for a layer
    accelerate offloads, its execution device), to load into."""
    from .nn.int4_linear import Int4Linear, swap_module

    for name, rec in deployed.items():
        if name not in modules:
            raise CheckpointError(f"checkpoint layer {name} is not in this model")
        old = modules[name]
        weight = getattr(old, "weight", None)
        device = None if weight is None else weight.device
        if store is not None and weight is not None and weight.is_meta:
            device = store.runs_on(name)
        spec = {k: v for k, v in rec.items() if k != "name"}
        swap_module(model, name, Int4Linear.from_spec(spec, device=device))


def _load_offloaded(model, tensors, store) -> set[str]:
    """Checkpoint tensors whose model tensor accelerate offloads go to its store (loaded
    from there before each forward); the ranges and masks of offloaded layers (on ``meta``,
    in no store) are put in the layer, on its execution device. Returns their names."""
    if store is None:
        return set()
    own, done = model.state_dict(keep_vars=True), set()
    for name, value in tensors.items():
        t = own.get(name)
        if t is None or not t.is_meta:
            continue
        mname, _, attr = name.rpartition(".")
        module = model.get_submodule(mname)
        if name in store or attr in module._parameters:
            store.write(name, value)
        else:
            module._buffers[attr] = value.to(store.runs_on(mname))
        done.add(name)
    return done


def _check_layers(layers, modules) -> None:
    for rec in layers:
        if rec["name"] not in modules:
            raise CheckpointError(f"checkpoint layer {rec['name']} is not in this model; load "
                                  "into the same architecture the checkpoint was made from")


def _check_shapes(model, tensors, layers, modules) -> None:
    own = model.state_dict()
    for name, t in tensors.items():
        if name in own and own[name].shape != t.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape "
                                  f"{tuple(own[name].shape)}; the checkpoint was made from a "
                                  "different model")


def _check_missing_are_tied(model, missing) -> None:
    shared = {}
    for name, t in model.state_dict().items():
        shared.setdefault((t.untyped_storage().data_ptr(), tuple(t.shape)), []).append(name)
    tied = {n for names in shared.values() if len(names) > 1 for n in names}
    really_missing = sorted(n for n in missing if n not in tied)
    if really_missing:
        raise CheckpointError(f"checkpoint lacks tensors the model needs: {really_missing[:5]}")
