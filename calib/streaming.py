"""Layer streaming: calibrate models larger than the GPU, one layer on the GPU at a time (the
decoder layers; an encoder-decoder model's encoder layers, then its decoder layers).

Two sources of weights:

- a model in CPU memory: each layer moves to ``device`` for its turn and back to ``offload``;
- a model on the ``meta`` device from :func:`load_streaming`: each layer's tensors are read
  from the safetensors checkpoint folder straight onto ``device`` when the layer's turn comes
  (``safe_open`` reads single tensors), so the full float model is never resident anywhere.

Inside ``with stream_layers(model, "cuda"):`` every calibration path streams:
:func:`~modelopt_lite.calib.sequential.run_sequential` (AWQ, SmoothQuant, SparseGPT, ...) loads
each layer once and keeps the processed layer on ``offload``; a whole-model forward (static
activation ranges) loads each layer for each batch through forward hooks. Layer-boundary
activations stay on the GPU when they fit (``store_device="auto"``), else on the CPU.

Example::

    model = load_streaming("llama-70b/")                  # meta device, embeddings on CPU
    with stream_layers(model, "cuda"):
        mtl.quantize(model, "int4_awq", calib=tokens)     # ~one layer on the GPU at a time
    mtl.save(model, "out/")                               # processed layers live on the CPU
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..models import _under, layer_stacks
from ..nn.quant_modules import is_quantized

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A streaming checkpoint that does not match the model."""


class SafetensorsCheckpoint:
    """Index of a folder of ``*.safetensors`` shards: tensor name -> shard; reads on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({k: path.name for k in f.keys()})
        if not self.files:
            raise CheckpointError(f"{self.folder}: no *.safetensors tensors found; save the model "
                                  "with save_pretrained(..., safe_serialization=True) first")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names, device="cpu", dtype: torch.dtype | None = None) -> dict:
        """The named tensors on ``device`` (floating ones cast to ``dtype`` when given)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), framework="pt", device=str(device)) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def _slots(root: nn.Module, prefix: str, skip=()):
    """id(tensor) -> (tensor, [(module, attr, is_param, checkpoint key)]) for meta tensors
    outside the module paths ``skip`` (a path or several)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip or ())
    groups: dict[int, tuple[torch.Tensor, list]] = {}
    for mname, m in root.named_modules(remove_duplicate=False):
        if _under(mname, skip):
            continue
        for is_param, table in ((True, m._parameters), (False, m._buffers)):
            for attr, t in table.items():
                if t is not None and t.is_meta:
                    key = prefix + (f"{mname}.{attr}" if mname else attr)
                    groups.setdefault(id(t), (t, []))[1].append((m, attr, is_param, key))
    return groups


def materialize_(root: nn.Module, checkpoint: SafetensorsCheckpoint, prefix: str = "",
                 device="cpu", dtype=None, skip=()) -> int:
    """Replace ``root``'s meta tensors by the checkpoint's (key = ``prefix`` + name); tied
    tensors stay tied. Tensors the checkpoint lacks stay on meta. Returns the bytes loaded."""
    groups = _slots(root, prefix, skip)
    want = {}
    for tid, (_, slots) in groups.items():
        key = next((s[3] for s in slots if s[3] in checkpoint), None)
        if key is not None:
            want[key] = tid
    loaded = checkpoint.read(list(want), device, dtype)
    nbytes = 0
    for key, tid in want.items():
        old, slots = groups[tid]
        new = loaded[key]
        if new.shape != old.shape:
            raise CheckpointError(f"{key}: checkpoint shape {tuple(new.shape)} != model shape "
                                  f"{tuple(old.shape)}; the config does not match the weights")
        nbytes += new.numel() * new.element_size()
        param = nn.Parameter(new, requires_grad=old.requires_grad) if slots[0][2] else None
        for m, attr, is_param, _ in slots:
            (m._parameters if is_param else m._buffers)[attr] = param if is_param else new
    return nbytes


def drop_(root: nn.Module, checkpoint: SafetensorsCheckpoint, prefix: str = "",
          rest_device="cpu") -> None:
    """Free ``root``'s tensors that the checkpoint holds (back to meta); move the others
    (quantizer ranges, scales) to ``rest_device`` (None: leave them where they are)."""
    for mname, m in root.named_modules():
        for table in (m._parameters, m._buffers):
            for attr, t in list(table.items()):
                if t is None or t.is_meta:
                    continue
                key = prefix + (f"{mname}.{attr}" if mname else attr)
                if key in checkpoint:
                    new = torch.empty_like(t, device="meta")
                    table[attr] = nn.Parameter(new, t.requires_grad) if isinstance(
                        t, nn.Parameter) else new
                elif rest_device is None:
                    continue
                elif isinstance(t, nn.Parameter):
                    table[attr] = nn.Parameter(t.data.to(rest_device), t.requires_grad)
                else:
                    table[attr] = t.to(rest_device)


def _init_weight_ranges(layer: nn.Module) -> None:
    """Weight quantizers inserted while the weights were on meta take their ranges now."""
    for m in layer.modules():
        if is_quantized(m) and m.weight_quantizer is not None:
            q = m.weight_quantizer
            if q.amax is not None and q.amax.is_meta:
                q.init_from_weight(m.weight_2d())


def _meta_names(module: nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _move(obj, device):
    from .sequential import _move as move

    return move(obj, device)


class LayerStreamer:
    """Moves layer ``i`` onto ``device`` (:meth:`load`) and away again (:meth:`release`).

    The layers are those layer-by-layer calibration walks, numbered in order: the decoder
    layers, or an encoder-decoder model's encoder layers followed by its decoder layers
    (:meth:`stacks` gives each stack's range).

    ``checkpoint``: where meta layers' tensors come from (default: the one that
    :func:`load_streaming` attached). ``offload``: where a processed layer goes: ``"cpu"``
    (the quantized model ends in CPU memory) or ``"meta"`` (freed after ``sink(i, name,
    layer)`` has kept what it needs, e.g. written the layer's state dict). ``store_device``:
    where layer-boundary activations live (``"auto"``: on ``device`` if they take less than a
    quarter of its free memory, else on the CPU).
    """

    def __init__(self, model: nn.Module, device="cuda", *, checkpoint=None, offload="cpu",
                 store_device="auto", dtype: torch.dtype | None = None,
                 sink: Callable[[int, str, nn.Module], None] | None = None):
        if str(offload) == "meta" and sink is None:
            raise ValueError("offload='meta' frees every processed layer; pass sink=fn(i, name, "
                             "layer) that keeps its result (e.g. saves its state dict), or use "
                             "offload='cpu'")
        self.model, self.device = model, torch.device(device)
        self.checkpoint = checkpoint or getattr(model, "_modelopt_lite_checkpoint", None)
        if str(offload) == "meta" and self.checkpoint is None:
            raise ValueError("offload='meta' needs a checkpoint to read layers back from; load "
                             "the model with load_streaming(model_dir) or use offload='cpu'")
        self._stacks = layer_stacks(model)
        if str(offload) == "meta" and len(self._stacks) > 1 and not getattr(
                self.checkpoint, "writes_back", False):
            raise ValueError(f"{type(model).__name__}: offload='meta' frees each processed "
                             "layer, but an encoder-decoder's decoder calibrates on what the "
                             "processed encoder computes; use offload='cpu'")
        self.offload, self.store_device, self.dtype, self.sink = offload, store_device, dtype, sink
        self.paths = [path for path, _ in self._stacks]
        self._names = [f"{path}.{i}" for path, layers in self._stacks for i in range(len(layers))]
        self.layers = [layer for _, layers in self._stacks for layer in layers]
        self._from_checkpoint: set[int] = set()
        self._hooked: set[int] = set()
        self._handles: list = []
        self._paused: frozenset[int] = frozenset()   # layers whose hooks are off
        self.bytes_loaded = 0

    def name(self, i: int) -> str:
        return self._names[i]

    def stacks(self) -> list[tuple[str, range]]:
        """``(path, layer indices)`` of each stack, in the order the forward runs them."""
        out, start = [], 0
        for path, layers in self._stacks:
            out.append((path, range(start, start + len(layers))))
            start += len(layers)
        return out

    def load(self, i: int) -> nn.Module:
        layer = self.layers[i]
        if self.checkpoint is not None and _meta_names(layer):
            self.bytes_loaded += materialize_(layer, self.checkpoint, self.name(i) + ".",
                                              self.device, self.dtype)
            self._from_checkpoint.add(i)
        _init_weight_ranges(layer)
        missing = _meta_names(layer)
        if missing:
            raise CheckpointError(f"{self.name(i)}: {missing[:4]} have no weights (meta device) "
                                  "and the checkpoint does not hold them")
        return layer.to(self.device)

    def release(self, i: int, changed: bool = True) -> None:
        """Put layer ``i`` away: a changed layer goes to ``offload``; an unchanged one that
        came from the checkpoint is freed (it can be read again)."""
        layer = self.layers[i]
        if changed and str(self.offload) == "meta":
            self.sink(i, self.name(i), layer)
        from_ckpt = i in self._from_checkpoint
        if str(self.offload) == "meta" or (from_ckpt and not changed):
            home = getattr(self.checkpoint, "home_device", None)   # accelerate's device map
            drop_(layer, self.checkpoint, self.name(i) + ".",
                  (home and home(self.name(i))) or "cpu")
        else:
            layer.to(self.offload)
            if changed:
                self._from_checkpoint.discard(i)  # now resident, changed: never re-read

    def materialize_all(self, device="cpu") -> nn.Module:
        """Load every layer still on meta onto ``device`` (e.g. to save the whole model)."""
        for i, layer in enumerate(self.layers):
            if _meta_names(layer):
                self.bytes_loaded += materialize_(layer, self.checkpoint, self.name(i) + ".",
                                                  device, self.dtype)
                _init_weight_ranges(layer)
            layer.to(device)
            self._from_checkpoint.discard(i)
        return self.model

    # --- whole-model forward passes: load on entry, release on exit ---
    def attach(self) -> LayerStreamer:
        self.outer_device = _outer_device(self.model, self.paths)
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._pre, i),
                                                                 with_kwargs=True))
            self._handles.append(layer.register_forward_hook(partial(self._post, i)))
        self.model._modelopt_lite_streamer = self
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.model, "_modelopt_lite_streamer", None) is self:
            del self.model._modelopt_lite_streamer

    def _pre(self, i, module, args, kwargs):
        if i in self._paused or i in self._hooked:
            return None
        self.load(i)
        self._hooked.add(i)
        return _move(args, self.device), _move(kwargs, self.device)

    def _post(self, i, module, args, output):
        if i in self._paused or i not in self._hooked:
            return None
        self._hooked.discard(i)
        self.release(i, changed=False)
        return _move(output, self.outer_device)

    @contextmanager
    def pause(self, layers=None):
        """Hooks off (the sequential runner loads and releases layers itself): all of them,
        or those of the layer indices ``layers`` (a stack whose first inputs are captured
        while the stacks before it run through their hooks)."""
        before = self._paused
        self._paused = frozenset(range(len(self.layers)) if layers is None else layers)
        try:
            yield
        finally:
            self._paused = before

    def choose_store_device(self, nbytes: int) -> torch.device:
        if self.store_device != "auto":
            return torch.device(self.store_device)
        if self.device.type == "cuda":
            if nbytes < _cuda_free_bytes(self.device) // 4:
                return self.device
        return torch.device("cpu") if self.device.type != "cpu" else self.device


def _cuda_free_bytes(device: torch.device) -> int:
    """Free GPU memory, within a per-process cap (set_per_process_memory_fraction) if any."""
    if device.index is None:   # "cuda": the current device (the cap's query needs an index)
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    frac = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(min(free, frac * total - torch.cuda.memory_reserved(device)))


def _outer_device(model: nn.Module, layer_paths) -> torch.device:
    for name, p in model.named_parameters():
        if not _under(name, layer_paths) and not p.is_meta:
            return p.device
    return torch.device("cpu")


def active_streamer(model: nn.Module) -> LayerStreamer | None:
    return getattr(model, "_modelopt_lite_streamer", None)


@contextmanager
def stream_layers(model: nn.Module, device="cuda", **kwargs):
    """Within the block, calibration runs one decoder layer (an encoder-decoder model: one
    encoder, then one decoder layer) at a time on ``device``.

    Keyword arguments go to :class:`LayerStreamer` (``offload``, ``store_device``,
    ``checkpoint``, ``dtype``, ``sink``).
    """
    streamer = LayerStreamer(model, device, **kwargs).attach()
    try:
        yield streamer
    finally:
        streamer.detach()


def load_streaming(model_dir: str | Path, *, dtype: torch.dtype | None = None,
                   outer_device="cpu", trust_remote_code: bool = False) -> nn.Module:
    """A Hugging Face causal LM (or encoder-decoder: T5, BART, ...) from ``model_dir``
    (config.json + safetensors) whose layers stay on the ``meta`` device; everything else
    (embeddings, final norms, lm_head) is loaded onto ``outer_device``. Use it inside
    :func:`stream_layers`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    auto = (AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
            else AutoModelForCausalLM)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied lm_head is not stored in the checkpoint
    checkpoint = SafetensorsCheckpoint(model_dir)
    paths = [path for path, _ in layer_stacks(model)]
    materialize_(model, checkpoint, "", outer_device, dtype, skip=paths)
    missing = [n for n in _meta_names(model) if not _under(n, paths)]
    if missing:
        raise CheckpointError(f"{model_dir}: no weights for {missing[:4]} in the checkpoint")
    model._modelopt_lite_checkpoint = checkpoint
    return model.eval()
