"""Models whose weights accelerate offloads (``from_pretrained(..., device_map="auto")`` with
too little GPU memory, ``device_map`` entries ``"cpu"`` / ``"disk"``, ``dispatch_model``).

Such a model's offloaded parameters sit on the ``meta`` device; accelerate's hooks read each
module's values from a weights map (CPU tensors, or files in the offload folder) just before
its forward and drop them after. :class:`OffloadedWeights` is that store seen by tensor name:
it reads the values and writes changed ones back, so that the layer streamer
(:mod:`~modelopt_lite.calib.streaming`) can use it as its checkpoint. ``quantize()`` does so by
itself (:func:`offloaded_streaming`): each decoder layer is loaded from the store onto the
hooks' execution device for its turn, processed (AWQ's scales, GPTQ's rounding, ...), and its
changed weights are written back to the store, so the quantized model stays offloaded as it
came and the forward through accelerate's hooks computes the quantized function.

Written back means: a CPU-offloaded tensor is replaced in accelerate's CPU state dict; a
disk-offloaded one is written to a safetensors file in a folder of modelopt_lite's own (a
temporary folder inside the offload folder, or the system's temporary folder; removed with
the model) and accelerate's in-memory index is pointed at it. No file that existed before is
written to: neither the checkpoint's shards (which transformers reads in place) nor an offload
folder's ``.dat`` files (which accelerate may reuse for another model).

Example::

    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto",
                                                 max_memory={0: "20GiB", "cpu": "200GiB"})
    mtl.quantize(model, "int4_awq", calib=texts, tokenizer=tokenizer)   # layer by layer
    mtl.save(model, "out/")            # reads the offloaded tensors back
    mtl.deploy(model)                  # INT4 layers resident on the GPU
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook`` objects on ``module`` (inside a ``SequentialHook``
    too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None) or [hook]
    return [h for h in hooks if hasattr(h, "execution_device") and hasattr(h, "offload")]


def _offload_hook(module: nn.Module):
    return next((h for h in _align_hooks(module)
                 if h.offload and getattr(h, "weights_map", None) is not None), None)


def execution_devices(model: nn.Module) -> list[torch.device]:
    """The execution devices of ``model``'s accelerate hooks, in module order."""
    return [torch.device(h.execution_device) for m in model.modules() for h in _align_hooks(m)
            if h.execution_device is not None]


def has_offloaded_weights(model: nn.Module) -> bool:
    """True when accelerate keeps some of ``model``'s weights off the model (CPU or disk
    offload: the parameters are on ``meta``, the values in the hooks' weights maps)."""
    return any(_offload_hook(m) is not None for m in model.modules())


def _hook_tensor_names(module: nn.Module, hook) -> list[str]:
    """What the hook loads before the module's forward (accelerate's own rule)."""
    from accelerate.utils import named_module_tensors

    return [n for n, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules,
                                                remove_non_persistent=True)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class OffloadedWeights:
    """The tensors accelerate has offloaded from ``model``, by full name (``model.layers.3.
    mlp.down_proj.weight``): ``name in weights``, :meth:`read`, and :meth:`write` / the
    streamer's :meth:`sink` for changed values. Built once the model is dispatched; it follows
    the hooks present at that time."""

    writes_back = True   # the streamer may free processed layers: reading them gives the new values

    def __init__(self, model: nn.Module):
        self._model = model
        self._where: dict[str, tuple[object, str]] = {}   # full name -> (hook, key in its map)
        self._hooks: dict[str, object] = {}                 # module name -> offload hook
        self._homes: dict[str, torch.device] = {}           # module name -> execution device
        for mname, m in model.named_modules():
            for h in _align_hooks(m):
                if h.execution_device is not None:
                    self._homes.setdefault(mname, torch.device(h.execution_device))
            h = _offload_hook(m)
            if h is None:
                continue
            self._hooks[mname] = h
            for rel in _hook_tensor_names(m, h):
                if _holds(h.weights_map, rel):   # (a buffer added since is not there yet)
                    self._where[_join(mname, rel)] = (h, rel)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def execution_device(self) -> torch.device:
        """Where accelerate runs the offloaded modules (the first such hook's device)."""
        hook = next(iter(self._hooks.values()))
        return torch.device(hook.execution_device)

    def home_device(self, name: str) -> torch.device | None:
        """The execution device of the hooks on module ``name``, inside it or above it
        (where its resident tensors, e.g. quantizer ranges, belong); None without hooks."""
        best = None
        for mname, dev in self._homes.items():
            if mname == name or mname.startswith(name + ".") or name.startswith(mname + ".") \
                    or not mname:
                if best is None or len(mname) > len(best[0]):
                    best = (mname, dev)
        return None if best is None else best[1]

    def runs_on(self, name: str) -> torch.device:
        """Where module ``name`` runs: its hooks' device (:meth:`home_device`), else where
        accelerate runs the offloaded modules."""
        return self.home_device(name) or self.execution_device()

    def read(self, names, device="cpu", dtype: torch.dtype | None = None) -> dict:
        """The named tensors, copied onto ``device`` (floating ones cast to ``dtype``)."""
        out = {}
        for name in names:
            hook, key = self._where[name]
            stored = hook.weights_map[key]
            t = stored.to(device)
            if t.data_ptr() == stored.data_ptr():   # never hand out accelerate's own tensor
                t = t.clone()
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (a changed value, or a parameter new to an offloaded module) as
        the value accelerate loads for ``name``."""
        if name not in self._where:
            owner = self._owner(name)
            if owner is None:
                raise KeyError(f"{name}: not inside a module whose weights accelerate offloads")
            mname, hook = owner
            self._where[name] = (hook, name[len(mname) + 1:] if mname else name)
        hook, key = self._where[name]
        base, key = _base_map(hook.weights_map, key)
        value = tensor.detach().to("cpu", copy=True)
        from accelerate.utils import OffloadedWeightsLoader

        if not isinstance(base, OffloadedWeightsLoader):
            base[key] = value          # a plain map of CPU tensors
        elif key in base.state_dict or (key not in base.index and self._in_memory(hook)):
            base.state_dict[key] = value   # held in CPU memory (a new tensor: as its layer's)
        else:                          # on disk: a file of our own, the index pointed at it
            from safetensors.torch import save_file

            path = self._folder(base) / f"{key}.safetensors"
            save_file({key: value.contiguous()}, str(path))
            base.index[key] = {"safetensors_file": str(path), "weight_name": key}
            if key not in base.all_keys:
                base.all_keys.append(key)

    def _in_memory(self, hook) -> bool:
        """Whether ``hook``'s tensors are kept in CPU memory (not on disk)."""
        for h, rel in self._where.values():
            if h is hook:
                base, key = _base_map(h.weights_map, rel)
                return key in getattr(base, "state_dict", base)
        return True

    def _folder(self, loader) -> Path:
        """The model's folder for rewritten disk-offloaded tensors (made on first use, inside
        the offload folder when there is one; removed with the model)."""
        folder = getattr(self._model, "_modelopt_lite_rewritten", None)
        if folder is None:
            parent = loader.save_folder if loader.save_folder and os.path.isdir(
                loader.save_folder) else None
            folder = tempfile.TemporaryDirectory(prefix="modelopt_lite_rewritten_", dir=parent)
            self._model._modelopt_lite_rewritten = folder
            logger.info("changed disk-offloaded weights go to %s (removed with the model)",
                        folder.name)
        return Path(folder.name)

    def _owner(self, name: str):
        """(module name, hook) of the offloaded module whose hook loads tensor ``name``."""
        module = name.rpartition(".")[0]
        for mname, hook in sorted(self._hooks.items(), key=lambda kv: -len(kv[0])):
            if module == mname or (hook.place_submodules and
                                   (not mname or module.startswith(mname + "."))):
                return mname, hook
        return None

    def sink(self, i: int, name: str, layer: nn.Module) -> None:
        """The streamer's ``sink``: write layer ``name``'s offloaded tensors back. Tensors
        it gained (quantizer ranges, masks) stay with the layer; :meth:`complete` stores those
        the hooks will look up."""
        for mname, m in layer.named_modules():
            for attr, t in [*m._parameters.items(), *m._buffers.items()]:
                full = _join(_join(name, mname), attr)
                if t is not None and not t.is_meta and full in self._where:
                    self.write(full, t)

    def complete(self, model: nn.Module) -> None:
        """Write to the store every tensor an offload hook will look up that it lacks: the
        quantizer ranges of a layer whose hook offloads buffers, which a whole-model pass set
        without changing the layer's weights."""
        for mname, hook in self._hooks.items():
            module = model.get_submodule(mname)
            for rel in _hook_tensor_names(module, hook):
                full = _join(mname, rel)
                if full in self._where:
                    continue
                path, _, attr = rel.rpartition(".")
                t = getattr(module.get_submodule(path), attr)
                if t.is_meta:
                    raise KeyError(f"{full}: on the meta device and not in accelerate's offload "
                                   "store; nothing to load it from")
                self.write(full, t)

    @contextmanager
    def onloaded(self, name: str, module: nn.Module, device=None,
                 write_back: bool = False) -> Iterator[nn.Module]:
        """``module`` (called ``name`` in the model) with its offloaded tensors loaded onto
        ``device`` (default: where accelerate runs it); back on ``meta`` after the block,
        their changes written back to the store when ``write_back`` and the block succeeded.
        Tensors the block adds (quantizer ranges, masks) stay with the module."""
        from .streaming import drop_, materialize_

        device = device or self.runs_on(name)
        prefix = name + "." if name else ""
        materialize_(module, self, prefix, device)
        try:
            yield module
            if write_back:
                self.sink(0, name, module)
        finally:
            drop_(module, self, prefix, rest_device=None)


def at_hand(store: OffloadedWeights | None, name: str, module: nn.Module,
            write_back: bool = False):
    """Context: ``module`` (called ``name``) with its weight at hand: a weight accelerate
    offloads is loaded from ``store`` for the block (:meth:`OffloadedWeights.onloaded`, its
    changes written back when ``write_back``); a resident one is used as it is."""
    if store is None or not module.weight.is_meta:
        return nullcontext()
    if f"{name}.weight" not in store:
        raise ValueError(f"{name}: its weight is on the meta device and no accelerate offload "
                         "store holds it; load the model's weights first")
    return store.onloaded(name, module, write_back=write_back)


def _holds(weights_map, key: str) -> bool:
    """Whether accelerate's ``weights_map`` holds ``key``, without loading it."""
    base, key = _base_map(weights_map, key)
    state, index = getattr(base, "state_dict", None), getattr(base, "index", None)
    if isinstance(state, dict) and index is not None:   # an OffloadedWeightsLoader
        return key in state or key in index
    return key in base


def _base_map(weights_map, key: str):
    """(the mapping that holds ``key``, its key there): through accelerate's PrefixedDataset."""
    prefix = getattr(weights_map, "prefix", None)
    dataset = getattr(weights_map, "dataset", None)
    if prefix is not None and dataset is not None:
        return dataset, prefix + key
    return weights_map, key


def offloaded_weights(model: nn.Module) -> OffloadedWeights | None:
    """:class:`OffloadedWeights` of ``model``, or None when accelerate offloads nothing."""
    return OffloadedWeights(model) if has_offloaded_weights(model) else None


def offload_store(model: nn.Module) -> OffloadedWeights | None:
    """What ``quantize()`` and ``sparsify()`` calibrate an offloaded model through: its
    :class:`OffloadedWeights`, or None when accelerate offloads nothing or a layer streamer
    already handles the layers. Refuses, before any change, what the store cannot hold."""
    from ..moe import is_fused_experts
    from .streaming import active_streamer

    if active_streamer(model) is not None:
        return None
    weights = offloaded_weights(model)
    fused = [] if weights is None else [n for n, m in model.named_modules()
                                        if is_fused_experts(m)]
    if fused:
        raise NotImplementedError(
            f"{fused[0]}: accelerate offloads this model's weights, and its experts are fused "
            "3-D tensors, which modelopt_lite splits into one linear per expert (new weights "
            "that the offload store does not hold); load the model without CPU/disk offload "
            "(a device_map that fits, or modelopt_lite.calib.streaming.load_streaming)")
    return weights


class _PassThrough:
    """Stands in for a module's accelerate hook while the layer streamer moves the layer."""

    no_grad = False

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output


@contextmanager
def offloaded_streaming(model: nn.Module, weights: OffloadedWeights) -> Iterator[None]:
    """Calibrate an accelerate-offloaded model layer by layer: the hooks inside the layer
    stacks stand aside and the layer streamer loads each layer from ``weights`` onto the
    execution device, writes the processed layer back and frees it. The hooks are restored
    after, on success or failure."""
    from ..models import _under, layer_stacks
    from .streaming import stream_layers

    paths = [path for path, _ in layer_stacks(model)]
    parked = []
    for mname, m in model.named_modules():
        if _under(mname, paths) and _align_hooks(m):
            parked.append((m, m._hf_hook))
            m._hf_hook = _PassThrough()
    device = weights.execution_device()
    logger.info("accelerate offloads %d tensors of %s: each layer is loaded onto %s for its "
                "turn and its changed weights are written back", len(weights),
                type(model).__name__, device)
    try:
        with stream_layers(model, device, checkpoint=weights, offload="meta", sink=weights.sink):
            yield
        weights.complete(model)
    finally:
        for m, hook in parked:
            m._hf_hook = hook
