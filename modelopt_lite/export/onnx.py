"""Q/DQ ONNX export of a fake-quant model, in the patterns TensorRT builds.

Example::

    import modelopt_lite as mtl
    model = mtl.quantize(model, "w8a8", calib=texts, tokenizer=tok)
    mtl.export_onnx(model, tok("hello world", return_tensors="pt").input_ids, "model.onnx")
    assert not mtl.trt_check("model.onnx")

Patterns (see :mod:`.qdq_patterns`): INT8 activations ``QuantizeLinear -> DequantizeLinear``
(scalar scale, int8 zero point 0); INT8 weights as int8 initializers ``-> DequantizeLinear``
(per-channel scales, ``axis`` always written: 1 for ``[K, N]`` MatMul weights, 0 for Conv);
INT4 weight-only as packed INT4 initializers ``-> DequantizeLinear(axis=0, block_size) ->
MatMul`` at opset 21; unfolded smoothing scales as an explicit ``Mul``; an online input
rotation (``SmoothQuantConfig.rotate``) as ``Reshape -> MatMul [b, b] -> Reshape`` in front of
that ``Mul`` and the input's Q/DQ pair.

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) with
the export ops translated by :func:`.qdq_ops.translation_table`. Hugging Face causal LMs are
wrapped to return logits only, without a KV cache, with dynamic ``batch`` and ``seq`` axes.
The file is written atomically: into a temporary folder beside ``path``, then renamed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import is_encoder_decoder, is_generative
from .qdq_patterns import ExportError, dense_int4_conv, export_mode

logger = logging.getLogger(__name__)

PROTO_LIMIT = 2**31 - 2**26  # stay clear of protobuf's 2 GiB limit
TRT_MIN_OPSET = 13
INT4_OPSET = 21


@dataclass
class ExportResult:
    path: Path
    data_path: Path | None
    opset: int
    seconds: float
    qdq_nodes: int
    int4_initializers: int


# inputs the wrapper passes on, with the axes beside the batch that may vary: text (and its
# decoder side, for encoder-decoder models), then images for multimodal models
_SEQ_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask")
_IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes")
# Whisper's log-mel frames [batch, mels, frames]; wav2vec2's waveform [batch, samples]
_AUDIO_INPUTS = ("input_features", "input_values")
LM_INPUTS = _SEQ_INPUTS + _DECODER_INPUTS + _IMAGE_INPUTS + _AUDIO_INPUTS
_PRIMARY_INPUTS = ("input_ids", "input_features", "input_values", "pixel_values")   # one needed
# call options a batch or a user may carry: not graph inputs, dropped with a note
_CALL_OPTIONS = ("use_cache", "return_dict", "output_attentions", "output_hidden_states",
                 "labels", "past_key_values", "cache_position")


class LogitsOnly(nn.Module):
    """A Hugging Face model as ``(input_ids[, attention_mask, ...]) -> logits``, no KV cache:
    text, an encoder-decoder's ``decoder_input_ids`` and a vision model's ``pixel_values``
    (see :data:`LM_INPUTS`) are graph inputs when the example gives them. A model that does
    not generate gives the outputs :attr:`output_names` names (set from a call on the example:
    a question-answering model's ``start_logits`` and ``end_logits``, a headless model's
    ``last_hidden_state`` and ``pooler_output``); else its first output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.generative = is_causal_lm(model)
        # Hugging Face names a model with a head <Arch>For<Task>; a base model <Arch>Model
        headless = not self.generative and "For" not in type(model).__name__
        self.output_names = ("last_hidden_state",) if headless else ("logits",)
        self.all_outputs = False

    def find_outputs(self, kwargs: dict) -> None:
        """Name every tensor output of a non-generative model, from one call on ``kwargs``."""
        if self.generative:
            return
        with torch.no_grad():
            out = self.forward(**kwargs, _raw=True)
        if isinstance(out, dict):
            names = tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))
            if names:
                self.output_names, self.all_outputs = names, True

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, decoder_input_ids=None, decoder_attention_mask=None,
                pixel_values=None, pixel_attention_mask=None, image_sizes=None,
                input_features=None, input_values=None, _raw=False):
        given = {k: v for k, v in locals().items() if k in LM_INPUTS and v is not None}
        if attention_mask is None and input_ids is not None and is_encoder_decoder(self.model):
            # what eager code builds when none is given; some encoders (LongT5's local
            # attention) skip building it while being traced
            given["attention_mask"] = torch.ones_like(input_ids)
        out = self.model(**given, **({"use_cache": False} if self.generative else {}))
        if _raw or isinstance(out, torch.Tensor):
            return out
        if self.all_outputs:
            values = tuple(out[name] for name in self.output_names)
            return values if len(values) > 1 else values[0]
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates (causal, encoder-decoder or multimodal)."""
    return is_generative(model)


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face transformers model (generative or not: BERT, ViT, a base model): one
    with a ``config`` naming its ``model_type`` whose forward takes ``input_ids``,
    ``pixel_values``, ``input_features`` or ``input_values`` by name."""
    if is_causal_lm(model):
        return True
    if not isinstance(getattr(getattr(model, "config", None), "model_type", None), str):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in params for name in _PRIMARY_INPUTS)


def _as_args(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):  # BatchEncoding
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def prepare(model: nn.Module, example_inputs, all_outputs: bool = False):
    """(module to export, args, kwargs, input names, output names) for ``model``;
    ``all_outputs``: a non-generative Hugging Face model's wrapper gives every tensor output
    (found by one call on the example), not only the first."""
    args, kwargs = _as_args(example_inputs)
    if not is_hf_model(model):
        return _as_given(model, args, kwargs)
    given = args, kwargs
    name = type(model).__name__
    own = ("Fix: export a module of your own that calls the model with its inputs and returns "
           "a tensor (export_onnx passes a plain module's inputs as given)")
    if len(args) > 2:
        raise ExportError(f"{name}: give more than (input_ids, attention_mask) as a dict of "
                          f"named inputs, e.g. {{'input_ids': ..., 'decoder_input_ids': ...}}")
    if args:   # by the forward's own names: a vision model's first input is pixel_values
        names = list(_positional_names(model, args))
        if len(names) < len(args):   # no signature to read: a text model's
            names = ["input_ids", "attention_mask"]
        kwargs = dict(zip(names, args)) | kwargs
    dropped = sorted(k for k in kwargs if k in _CALL_OPTIONS)
    if dropped:
        logger.info("%s: %s are call options, not graph inputs: left out", name, dropped)
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in LM_INPUTS and k not in _CALL_OPTIONS and v is not None)
    if unknown and not is_causal_lm(model):   # LayoutLM's bbox: the inputs as the user gave
        logger.info("%s: %s are inputs the logits wrapper does not pass; the model is "
                    "exported with its inputs as given (only the batch axis symbolic)",
                    name, unknown)
        return _as_given(model, *given)
    if unknown:
        raise ExportError(f"{name}: the logits-only wrapper does not pass the input(s) {unknown} "
                          f"(it passes {list(LM_INPUTS)}). {own}")
    kwargs = {k: kwargs[k] for k in LM_INPUTS if kwargs.get(k) is not None}
    if not any(k in kwargs for k in _PRIMARY_INPUTS):
        raise ExportError(f"{name}: the example inputs need input_ids (or a speech model's "
                          f"input_features or input_values, a vision model's pixel_values). "
                          f"{own}")
    if is_encoder_decoder(model) and "decoder_input_ids" not in kwargs:
        if "input_ids" not in kwargs:
            raise ExportError(f"{name}: give the decoder's tokens as decoder_input_ids beside "
                              f"input_features")
        from ..calib.runner import decoder_inputs

        kwargs |= decoder_inputs(model, kwargs["input_ids"])   # the text shifted right
    wrapper = LogitsOnly(model)
    if all_outputs:
        wrapper.find_outputs(kwargs)
    return wrapper, (), kwargs, list(kwargs), list(wrapper.output_names)


def _as_given(model: nn.Module, args, kwargs):
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    return model, args, kwargs, names, ["output"]


def _axis_labels(name: str, lm: bool, rank: int = 2) -> dict[int, str]:
    """The input's axes that stay symbolic, with their names in the ONNX file; ``rank``: the
    input's number of axes (a multiple-choice model's text is [batch, choices, seq])."""
    if not lm:
        return {0: "batch"}
    if name in _SEQ_INPUTS:
        return {0: "batch", 1: "choices", 2: "seq"} if rank == 3 else {0: "batch", 1: "seq"}
    if name in _DECODER_INPUTS:
        return {0: "batch", 1: "decoder_seq"}
    if name in _IMAGE_INPUTS:
        return {0: "images"}   # "batch" where the model's code ties the two
    if name == "input_values":
        return {0: "batch", 1: "samples"}
    return {0: "batch"}


def _rank(value) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _dynamic_shapes(args, kwargs, lm: bool, static=frozenset()):
    """Dynamic batch (and, for generative models, sequence) axes; ``static`` holds
    ``(input, axis)`` pairs that tracing specialised, kept at the example's size."""
    names = list(kwargs) if kwargs else [str(i) for i in range(len(args))]
    values = list(kwargs.values()) if kwargs else list(args)
    shapes = [{a: torch.export.Dim.DYNAMIC for a in _axis_labels(n, lm, _rank(v))
               if (n, a) not in static} or None for n, v in zip(names, values)]
    return dict(zip(names, shapes)) if kwargs else tuple(shapes)


_SPECIALISED = re.compile(r"inferred a static shape of \d+ for dimension "
                          r"\w+\[(?:'(\w+)'|(\d+))\]\.shape\[(\d+)\]")


def _positional_names(module, args) -> dict[str, str]:
    """forward's parameter name -> the index (as a string) of the positional input it takes."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}
    return {name: str(i) for i, name in enumerate(params[:len(args)])}


def _specialised_axes(err: BaseException, positional: dict[str, str]) -> set[tuple[str, int]]:
    """``(input, axis)`` pairs torch.export reports as made static by the model's code; an
    input is a keyword's name or a positional input's index."""
    found = set()
    for e in _chain(err, context=True):
        for name, index, axis in _SPECIALISED.findall(str(e)):
            found.add((positional.get(name, name) if name else index, int(axis)))
    return found


def _chain(err: BaseException, context: bool = False) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``; with ``context`` also
    those it was raised while handling), outermost first, each once."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (err.__context__ if context else None)
    return chain


def _widen(args, kwargs, lm: bool, static=frozenset()):
    """Size-1 dynamic dims are specialised by torch.export: repeat them to 2 for tracing."""
    def widen(name, t):
        for dim in _axis_labels(name, lm, _rank(t)):
            if (isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == 1
                    and (name, dim) not in static):
                t = torch.cat([t, t], dim=dim)
        return t

    return (tuple(widen(str(i), a) for i, a in enumerate(args)),
            {k: widen(k, v) for k, v in kwargs.items()})


def _has_int4(layers) -> bool:
    """Whether the graph holds INT4 DequantizeLinear (not a conv with INT4 weights: it goes
    in as its rounded float weight)."""
    return any(m.weight_quantizer.enabled and m.weight_quantizer.spec.num_bits == 4
               and not dense_int4_conv(m) for _, m in layers)


def _choose_opset(opset, layers) -> int:
    need = INT4_OPSET if _has_int4(layers) else TRT_MIN_OPSET
    if opset is None:
        return INT4_OPSET if need == INT4_OPSET else 19
    if opset < need:
        raise ExportError(f"opset {opset} is too low: "
                          + ("INT4 blocked DequantizeLinear needs opset 21" if need == 21 else
                             "per-channel DequantizeLinear needs opset 13")
                          + f". Fix: pass opset>={need} (or leave it out)")
    return opset


def _trace(module, args, kwargs, opset, dynamic, input_names, output_names):
    from .qdq_ops import translation_table

    lm = isinstance(module, LogitsOnly)
    positional = _positional_names(module, args)
    static: set[tuple[str, int]] = set()
    while True:
        a, kw, shapes = args, kwargs, None
        if dynamic:
            fixed = frozenset(static)
            a, kw = _widen(args, kwargs, lm, fixed)
            shapes = _dynamic_shapes(a, kw, lm, fixed)
        try:
            with warnings.catch_warnings(), torch.no_grad(), _folding_notes_to_debug():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module, a, kwargs=kw or None, dynamo=True, opset_version=opset,
                    custom_translation_table=translation_table(), input_names=input_names,
                    output_names=output_names, dynamic_shapes=shapes,
                    external_data=False, optimize=True, verbose=False)
            break
        except Exception as err:  # noqa: BLE001 - re-raised below unless an axis was specialised
            more = _specialised_axes(err, positional) - static if dynamic else set()
            if not more:
                raise _trace_error(module, err, dynamic) from err
            static |= more
    if static:
        names = dict(zip([str(i) for i in range(len(args))], input_names))
        fixed = ", ".join(f"{names.get(n, n)} axis {a} = "
                          f"{(kwargs[n] if kwargs else args[int(n)]).shape[a]}"
                          for n, a in sorted(static))
        logger.warning("%s: the model's code fixes %s while tracing, so the ONNX file takes "
                       "only that size there (the other axes stay dynamic)",
                       _model_name(module), fixed)
    return program.model_proto


class _FoldingNote(logging.Filter):
    """onnxscript's constant folding warns "Evaluation failed: ..." for each constant it
    cannot precompute (BERT's token-type buffer, say) and leaves that node in the graph: not
    a failure, so it becomes a debug line of this module's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith(
                "Evaluation failed"):
            logger.debug("constant folding left a node unfolded: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _folding_notes_to_debug():
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    note = _FoldingNote()
    folding.addFilter(note)
    try:
        yield
    finally:
        folding.removeFilter(note)


def _model_name(module) -> str:
    inner = module.model if isinstance(module, LogitsOnly) else module
    return type(inner).__name__


def _trace_error(module, err: BaseException, dynamic: bool) -> ExportError:
    """torch.export's failure as an ExportError that names the model and the root cause."""
    root = _chain(err)[-1]
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    reason = f"{type(root).__name__}: {lines[0] if lines else ''}"[:500]
    return ExportError(
        f"torch.onnx.export (dynamo) failed on {_model_name(module)}: {reason}. The Q/DQ "
        f"export needs a model torch.export can trace and whose ops ONNX has (no complex "
        f"tensors, no data-dependent branches); the float model most likely fails the same way "
        f"(check with torch.onnx.export(model, ..., dynamo=True)). Fix: "
        + ("export_onnx(..., dynamic_axes=False) if the failure is about dynamic shapes; else "
           if dynamic else "")
        + "a model code path torch.export supports (e.g. attn_implementation='eager')")


def _postprocess(proto, input_names, lm: bool):
    from . import onnx_graph as G

    n_int4 = G.repack_int4_initializers(proto)
    G.drop_unused_initializers(proto)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in proto.graph.input}
    G.rename_dims(proto, {name: _axis_labels(name, lm, ranks.get(name, 2))
                          for name in input_names})
    for node in proto.graph.node:  # the exporter's per-node stack traces; keep graphs small
        del node.metadata_props[:]
    proto.producer_name = "modelopt_lite"
    return n_int4


def _check_writable(path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {parent} does not exist. Fix: create it")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {parent} is not writable")


def save_atomic(proto, path: Path, external_data: bool) -> Path | None:
    """Save (and check) ``proto`` at ``path`` via a temp folder beside it; None or data path."""
    import onnx

    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_file = tmp / path.name
        onnx.save_model(proto, str(tmp_file), save_as_external_data=external_data,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        onnx.checker.check_model(str(tmp_file))
        if external_data:
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp_file, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path.parent / data_name if external_data else None


def _check_resident(model: nn.Module) -> None:
    """The graph holds every weight: refuse a model whose weights accelerate offloads."""
    from ..calib.offload import has_offloaded_weights

    if has_offloaded_weights(model):
        raise ExportError(
            f"{type(model).__name__}: accelerate offloads some of its weights to CPU or disk "
            "(device_map), and an ONNX graph holds them all; save it (modelopt_lite.save), "
            "load the checkpoint into the float model in CPU memory (modelopt_lite.load), and "
            "export that")


def export_onnx(model: nn.Module, example_inputs, path, opset: int | None = None,
                external_data: bool | None = False, dynamic_axes: bool = True) -> ExportResult:
    """Export a fake-quant ``model`` to a Q/DQ ONNX file at ``path``; return what was written.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors.
    A Hugging Face model is exported as inputs -> logits without a KV cache: token ids,
    optionally an attention mask and token types, a multimodal or vision model's
    ``pixel_values`` and an encoder-decoder's ``decoder_input_ids`` (the text shifted right
    when not given; see :data:`LM_INPUTS`); a model that does not generate gives all its
    tensor outputs, by name (a classifier's ``logits``, a question-answering model's
    ``start_logits`` and ``end_logits``, ``BertModel``'s ``last_hidden_state`` and
    ``pooler_output``). Any other module is exported with its inputs as given and its
    outputs. ``opset`` defaults to 21 when
    any INT4 weight is present, else 19. ``external_data=True`` writes the weights to
    ``<path>.data`` beside a small graph file (tensors under 1 KiB, such as scales and shape
    constants, stay inline); models over 2 GB always do. ``dynamic_axes``
    makes the batch axis (and, for Hugging Face models, the sequence axes) symbolic; an axis
    the model's own code fixes while tracing (Mamba's sequence) stays at the example's size,
    with a warning.
    Raises :class:`ExportError` (nothing written) for models TensorRT cannot take.
    """
    start = time.perf_counter()
    path = Path(path)
    _check_writable(path)
    _check_resident(model)
    was_training = model.training
    model.eval()
    try:
        module, args, kwargs, in_names, out_names = prepare(model, example_inputs,
                                                            all_outputs=True)
        with export_mode(model) as layers:
            opset = _choose_opset(opset, layers)
            proto = _trace(module, args, kwargs, opset, dynamic_axes, in_names, out_names)
    finally:
        model.train(was_training)
    from . import onnx_graph as G

    lm = isinstance(module, LogitsOnly)
    n_int4 = _postprocess(proto, [i.name for i in proto.graph.input], lm)
    if not external_data and G.initializer_bytes(proto) > PROTO_LIMIT:
        logger.info("%s: weights exceed 2 GB, writing them as external data", path)
        external_data = True
    data_path = save_atomic(proto, path, bool(external_data))
    n_qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    result = ExportResult(path, data_path, opset, time.perf_counter() - start, n_qdq, n_int4)
    logger.info("exported %s (opset %d, %d Q/DQ nodes) in %.1f s", path, opset, n_qdq,
                result.seconds)
    return result
