"""Layer-by-layer calibration: capture the inputs of decoder layer 0, then for each layer i
process it (collect statistics, search, quantize), replay it on its inputs and feed the
(quantized) outputs to layer i + 1. Only one layer's activations are held at a time.

With ``device`` set, each layer is moved there for its turn and back to ``offload`` after, so a
model larger than the GPU calibrates with about one layer plus its activations on the GPU.
Inside :func:`~modelopt_lite.calib.streaming.stream_layers` the active streamer decides
instead (and can read each layer from a safetensors checkpoint onto the GPU). Under
``torch.distributed`` each rank replays its own shard; statistics reduce inside the collectors.

Example::

    def process(index, name, layer, inputs):
        stats = inputs.collect_stats(layer, {"mlp.up_proj": layer.mlp.up_proj})
        ...
    run_sequential(model, forward_loop, process)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import UnsupportedModelError, layer_stacks, shared_layer_outputs
from .stats import ChannelStatsCollector

logger = logging.getLogger(__name__)

_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


def _is_cache(obj) -> bool:
    """A transformers key/value cache object (``Cache`` and its subclasses)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


class _Captured(Exception):
    pass


class StopForward(Exception):
    """Raised by a hook during :meth:`LayerInputs.feed` to end the current batch's forward
    early, once the hook has seen everything it needs from it."""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class LayerInputs:
    """The captured ``(args, kwargs)`` of every calibration batch for the current layer."""

    def __init__(self, store_device: torch.device | str | None = None, device=None):
        self.entries: list[tuple[tuple, dict]] = []
        self.store_device = store_device
        self.device = device  # where replays run when run() is given no device

    def nbytes(self) -> int:
        """Bytes of the tensors held (all batches' args and kwargs)."""
        seen, total = set(), 0
        for t in _tensors(self.entries):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def to(self, device) -> LayerInputs:
        """Keep every captured tensor on ``device`` from now on (in place)."""
        self.store_device = device
        self.entries = [(_move(a, device), _move(k, device)) for a, k in self.entries]
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, args: tuple, kwargs: dict) -> None:
        # a key/value cache would grow on every replay: none, by name or, passed positionally
        # (GIT), by type
        kwargs = {k: (None if k in _CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
        args = tuple(None if _is_cache(a) else a for a in args)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if self.store_device is not None:
            args, kwargs = _move(args, self.store_device), _move(kwargs, self.store_device)
        self.entries.append((args, kwargs))

    def hidden(self, i: int) -> torch.Tensor:
        args, kwargs = self.entries[i]
        return args[0] if args else kwargs["hidden_states"]

    def replace_hidden(self, i: int, h: torch.Tensor) -> None:
        args, kwargs = self.entries[i]
        if args:
            self.entries[i] = ((h, *args[1:]), kwargs)
        else:
            self.entries[i] = (args, {**kwargs, "hidden_states": h})

    @torch.no_grad()
    def run(self, layer: nn.Module, device=None, shared=()) -> list[torch.Tensor]:
        """Replay ``layer`` on every captured input; return its hidden-state outputs.
        ``shared``: ``(output index, argument index)`` pairs: those outputs become the captured
        positional arguments of the next layers (T5's position biases, which its first layer
        computes and the stack hands on)."""
        outs = []
        for j, (args, kwargs) in enumerate(self._batches(device)):
            out = layer(*args, **kwargs)
            full = out if isinstance(out, (tuple, list)) else (out,)
            outs.append(full[0])
            self._keep_shared(j, full, shared)
        return outs

    def _batches(self, device=None):
        """Each batch's ``(args, kwargs)``, moved to ``device`` (default: ``self.device``)."""
        device = self.device if device is None else device
        for args, kwargs in self.entries:
            if device is not None:
                args, kwargs = _move(args, device), _move(kwargs, device)
            yield args, kwargs

    @torch.no_grad()
    def feed(self, layer: nn.Module, device=None,
             after_batch: Callable[[], None] | None = None) -> None:
        """Replay ``layer`` on every captured input for its hooks' sake, keeping no outputs.
        A hook may raise :class:`StopForward` to cut a batch short; ``after_batch`` is called
        after each batch."""
        for args, kwargs in self._batches(device):
            try:
                layer(*args, **kwargs)
            except StopForward:
                pass
            if after_batch is not None:
                after_batch()

    @torch.no_grad()
    def advance(self, layer: nn.Module, shared=()) -> None:
        """Replace every batch's hidden state by ``layer``'s output, one batch at a time
        (outputs go to ``store_device`` at once, so only one batch's output is on the GPU);
        ``shared`` as in :meth:`run`."""
        for j, (args, kwargs) in enumerate(self.entries):
            out = layer(*_move(args, self.device), **_move(kwargs, self.device))
            full = out if isinstance(out, (tuple, list)) else (out,)
            self._keep_shared(j, full, shared)
            h = full[0]
            self.replace_hidden(j, h if self.store_device is None else h.to(self.store_device))

    def _keep_shared(self, j: int, full, shared) -> None:
        """Batch ``j``'s outputs ``full`` named by ``shared`` become its captured arguments
        (positional by index, keyword by name) where they are still None."""
        for o, a in shared:
            if o >= len(full) or full[o] is None:
                continue
            value = full[o] if self.store_device is None else full[o].to(self.store_device)
            held, kwargs = self.entries[j]
            if isinstance(a, str):
                if kwargs.get(a) is None:
                    self.entries[j] = (held, {**kwargs, a: value})
            elif a < len(held) and held[a] is None:
                self.entries[j] = (held[:a] + (value,) + held[a + 1:], kwargs)

    def forward_loop(self, layer: nn.Module, device=None) -> Callable[[nn.Module], None]:
        """A forward loop that replays this layer (for hook-based collectors)."""
        return lambda _model: self.run(layer, device)

    def collect_stats(self, layer: nn.Module, modules: dict[str, nn.Module], device=None,
                      transforms: dict | None = None, required: bool = True):
        """Per-input-channel statistics of ``modules`` (inside ``layer``) over all inputs;
        ``transforms`` maps a name to a function applied to that module's input first. A
        module no input reached gets None with ``required=False`` (else an error)."""
        collectors = {n: ChannelStatsCollector(n) for n in modules}
        transforms = transforms or {}

        def hook(name):
            collector, fn = collectors[name], transforms.get(name)
            if fn is None:
                return collector
            return lambda module, args: collector.update(fn(args[0]))

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            self.run(layer, device)
        finally:
            for h in handles:
                h.remove()
        return {n: c.result(required) for n, c in collectors.items()}


def capture_model_inputs(model: nn.Module, forward_loop, store_device=None) -> LayerInputs:
    """Run ``forward_loop(model)`` and keep the model's own inputs, for a model without a
    stack of identical blocks (a small CNN, an MLP) that is processed as one block."""
    inputs = LayerInputs(store_device)

    def recording_forward(*args, **kwargs):   # the model does not run (as at a layer 0)
        inputs.add(args, kwargs)

    model.forward = recording_forward
    try:
        forward_loop(model)
    finally:
        del model.forward
    if not len(inputs):
        raise ValueError("the forward loop never called the model; check that it calls the "
                         "model on calibration data")
    return inputs


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, forward_loop,
                               store_device=None) -> LayerInputs:
    """Run ``forward_loop(model)``, stopping each batch at layer 0 and keeping its inputs."""
    inputs = LayerInputs(store_device)
    first = layers[0]

    def catch(module, args, kwargs):
        inputs.add(args, kwargs)
        raise _Captured

    original_forward = model.forward

    def guarded_forward(*args, **kwargs):
        try:
            return original_forward(*args, **kwargs)
        except _Captured:
            return None

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    model.forward = guarded_forward
    try:
        forward_loop(model)
    finally:
        handle.remove()
        del model.forward
    if not len(inputs):
        raise ValueError("the forward loop never reached the first decoder layer; check that it "
                         "calls the model on calibration data")
    return inputs


ProcessLayer = Callable[[int, str, nn.Module, LayerInputs], None]


def run_sequential(model: nn.Module, forward_loop, process: ProcessLayer, *, device=None,
                   offload=None, store_device=None, progress: bool = True,
                   desc: str = "layers") -> None:
    """Call ``process(i, name, layer, inputs)`` for each decoder layer, in order (each layer of
    an encoder-decoder model's encoder, then of its decoder; ``i`` counts within a stack). A
    model without a stack of identical blocks (a plain CNN) is one block:
    ``process(0, "", model, inputs)`` on the model's own inputs.

    ``process`` may change the layer (quantize, fold, prune); the layer is then replayed on
    ``inputs`` and its outputs become the next layer's inputs. ``device``: where each layer
    runs (moved there for its turn, back to ``offload`` after, when ``offload`` is given).
    ``store_device``: where captured activations are kept between layers (e.g. "cpu").
    """
    from .streaming import active_streamer

    streamer = active_streamer(model)
    if streamer is not None:
        return _run_streamed(model, forward_loop, process, streamer, progress, desc)
    try:
        stacks = layer_stacks(model)
    except UnsupportedModelError as err:
        logger.info("%s: %s; the whole model is calibrated as one block",
                    type(model).__name__, str(err).split(". ")[0])
        process(0, "", model, capture_model_inputs(model, forward_loop, store_device))
        return None
    shared = shared_layer_outputs(model)
    for path, layers in stacks:   # an encoder-decoder's decoder sees the processed encoder
        inputs = capture_first_layer_inputs(model, layers, forward_loop, store_device)
        inputs.device = device
        label = desc if len(stacks) == 1 else f"{desc} ({path})"
        for i in tqdm(range(len(layers)), desc=label, disable=not progress):
            layer = layers[i]
            if device is not None:
                layer.to(device)
            process(i, f"{path}.{i}", layer, inputs)
            outs = inputs.run(layer, device, shared)
            for j, h in enumerate(outs):
                inputs.replace_hidden(j, h if store_device is None else h.to(store_device))
            if offload is not None:
                layer.to(offload)
        del inputs


def _run_streamed(model, forward_loop, process, streamer, progress, desc) -> None:
    """The same walk, with the streamer loading each layer onto its device and putting the
    processed layer away (offload) before the next one is loaded. An encoder-decoder's
    decoder inputs are captured by a forward pass whose (processed) encoder layers the
    streamer loads one at a time."""
    shared = shared_layer_outputs(model)
    stacks = streamer.stacks()
    for path, indices in stacks:
        with streamer.pause(indices):
            inputs = capture_first_layer_inputs(model, streamer.layers[indices.start:],
                                                forward_loop)
        inputs.to(streamer.choose_store_device(inputs.nbytes()))
        inputs.device = streamer.device
        logger.info("streaming %d layers of %s on %s; %.1f MB of layer inputs on %s",
                    len(indices), path, streamer.device, inputs.nbytes() / 1e6,
                    inputs.store_device)
        label = desc if len(stacks) == 1 else f"{desc} ({path})"
        with streamer.pause():
            for i in tqdm(indices, desc=label, disable=not progress):
                layer = streamer.load(i)
                process(i - indices.start, streamer.name(i), layer, inputs)
                inputs.advance(layer, shared)
                streamer.release(i, changed=True)
        del inputs
