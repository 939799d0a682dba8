"""Forward-loop runners: feed calibration batches through a model with a progress bar.

``forward_loop(model)`` is the one interface every calibration step takes: the built-in
:func:`make_forward_loop` turns token batches into one, and users may pass their own.

Example::

    tokens = calib_tokens(texts, tokenizer, n_samples=64, seq_len=512)
    loop = make_forward_loop(tokens, batch_size=4)
    loop(model)
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import is_encoder_decoder

logger = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], None]


def model_device(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: its first parameter's device, past parameters on
    ``meta`` (offloaded by accelerate or streamed), else the first accelerate hook's execution
    device, else the CPU."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    from .offload import execution_devices

    return next(iter(execution_devices(model)), torch.device("cpu"))


def iter_batches(tokens: torch.Tensor, batch_size: int):
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i:i + batch_size]


def make_forward_loop(tokens: torch.Tensor, batch_size: int = 1, progress: bool = True,
                      desc: str = "calibrating") -> ForwardLoop:
    """A forward loop over a ``[n_samples, seq_len]`` token tensor, on the model's device."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"calibration tokens must be a non-empty [n_samples, seq_len] tensor, "
                         f"got shape {tuple(tokens.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    def forward_loop(model: nn.Module) -> None:
        _check_vocab(model, tokens)
        device = model_device(model)
        n = (tokens.shape[0] + batch_size - 1) // batch_size
        with torch.no_grad():
            for batch in tqdm(iter_batches(tokens, batch_size), total=n, desc=desc,
                              disable=not progress, leave=False):
                batch = batch.to(device)
                model(batch, **decoder_inputs(model, batch))

    return forward_loop


@functools.lru_cache(maxsize=None)
def _takes_decoder_inputs(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``decoder_input_ids`` (or ``**kwargs``): an encoder alone
    (T5EncoderModel in transformers 4 keeps ``is_encoder_decoder``) takes none. Once a class."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return True
    return "decoder_input_ids" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def decoder_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """For an encoder-decoder model that does not derive its decoder's inputs itself (T5
    does not; BART does), the same text shifted right as ``decoder_input_ids``, as in
    teacher-forced training: the decoder calibrates on real tokens while it attends to the
    encoder's states. Else nothing."""
    if not is_encoder_decoder(model) or not _takes_decoder_inputs(type(model)):
        return {}
    for name in ("prepare_decoder_input_ids_from_labels", "_shift_right"):
        shift = getattr(model, name, None)
        if callable(shift):
            try:
                return {"decoder_input_ids": shift(labels=ids) if name.startswith("prepare")
                        else shift(ids)}
            except (TypeError, ValueError, AttributeError):
                continue   # e.g. no decoder_start_token_id in the config: shifted here
    cfg = model.config
    start = next((t for t in (getattr(cfg, "decoder_start_token_id", None),
                              getattr(cfg, "pad_token_id", None),
                              getattr(cfg, "bos_token_id", None)) if t is not None), 0)
    return {"decoder_input_ids": torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], 1)}


def _check_vocab(model: nn.Module, tokens: torch.Tensor) -> None:
    """Token ids outside the model's embedding table: a clear error, not an IndexError from
    deep inside the embedding (a tokenizer for another model, or random ids too large)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is None or tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration token ids span {lo}..{hi}, but the model's embedding has "
                         f"{vocab} rows: use the model's own tokenizer (or ids below {vocab})")


# targets a batch may carry: calibration passes them to no model
_LABEL_KEYS = frozenset({"labels", "label", "label_ids"})
# what a batch of text carries besides its ids; any other key makes it a batch of model inputs
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids",
                        "special_tokens_mask", "length"}) | _LABEL_KEYS


def _is_input_batch(batch) -> bool:
    """A batch the model takes as it is, not token ids: a floating-point tensor (images,
    features), a dict with inputs besides text (``pixel_values``, ``input_features``), or a
    tuple led by one of those (``(images, labels)``)."""
    if isinstance(batch, torch.Tensor):
        return batch.is_floating_point()
    if isinstance(batch, Mapping):
        return bool(set(batch) - _TEXT_KEYS)
    if isinstance(batch, (list, tuple)) and batch:
        return _is_input_batch(batch[0])
    return False


def input_batches(calib, n_samples: int, batch_size: int = 1) -> list | None:
    """``calib`` as a list of model-input batches (see :func:`_is_input_batch`) holding at
    least ``n_samples`` rows, when it is made of them (one such batch, an iterable of them:
    a list, a DataLoader, or a ``datasets.Dataset`` of such columns, taken ``batch_size``
    rows at a time); None for text and token sources."""
    if _is_input_batch(calib) and not isinstance(calib, (list, tuple)):
        return [calib]
    if isinstance(calib, (str, bytes, torch.Tensor, Mapping)) or not hasattr(calib, "__iter__"):
        return None
    if hasattr(calib, "column_names"):   # a datasets.Dataset: text (or tokens) by column
        return _dataset_batches(calib, n_samples, batch_size)
    if iter(calib) is calib:   # a one-shot iterator: peeking would lose its first item
        return None
    first = next(iter(calib), None)
    if first is None or not _is_input_batch(first):
        return None
    batches, rows = [], 0
    for batch in calib:
        batches.append(batch)
        rows += _rows(batch)
        if rows >= n_samples:
            break
    return batches


def _dataset_batches(dataset, n_samples: int, batch_size: int) -> list | None:
    """Batches of a ``datasets.Dataset`` whose columns are model inputs (images, audio), not
    text: no string column, and a column besides the text keys."""
    features = getattr(dataset, "features", None)
    if features is None or not set(dataset.column_names) - _TEXT_KEYS or any(
            getattr(f, "dtype", None) in ("string", "large_string") for f in features.values()):
        return None
    rows = dataset.with_format("torch")
    n = min(n_samples, len(rows))
    return [{k: v for k, v in rows[i:i + batch_size].items() if k not in _LABEL_KEYS}
            for i in range(0, n, max(1, batch_size))]


def _rows(batch) -> int:
    if isinstance(batch, Mapping):
        batch = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() else 1


def make_batch_loop(batches: list, batch_size: int = 1, progress: bool = True,
                    desc: str = "calibrating") -> ForwardLoop:
    """A forward loop over batches the model takes as they are, on the model's device: a
    dict is passed by name (``model(**batch)``, without labels), a tuple's first element
    and a tensor positionally. A single batch (one tensor or dict) is split into
    ``batch_size`` rows at a time; the batches of a list or DataLoader are used as given."""
    if len(batches) == 1 and batch_size >= 1:
        batches = _split(batches[0], batch_size)

    def forward_loop(model: nn.Module) -> None:
        device = model_device(model)
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                if isinstance(batch, Mapping):
                    model(**{k: _to(v, device) for k, v in batch.items()
                             if k not in _LABEL_KEYS})
                else:
                    model(_to(batch[0] if isinstance(batch, (list, tuple)) else batch, device))

    return forward_loop


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _split(batch, batch_size: int) -> list:
    n = _rows(batch)
    if isinstance(batch, Mapping):
        return [{k: v[i:i + batch_size] if isinstance(v, torch.Tensor) and v.dim()
                 and v.shape[0] == n else v for k, v in batch.items()}
                for i in range(0, n, batch_size)]
    if isinstance(batch, torch.Tensor):
        return list(batch.split(batch_size))
    return [batch]


def resolve_forward_loop(model, calib=None, forward_loop=None, tokenizer=None, n_samples=32,
                         seq_len=512, batch_size=1, seed=0, progress=True):
    """A forward loop from either ``forward_loop`` or a calibration source (``calib``): text
    or token ids (:func:`~modelopt_lite.calib.data.calib_tokens`), or batches of other model
    inputs (images, audio features; :func:`input_batches`)."""
    if forward_loop is not None:
        if calib is not None:
            raise ValueError("pass either calib= or forward_loop=, not both")
        return forward_loop
    if calib is None:
        return None
    batches = input_batches(calib, n_samples, batch_size)
    if batches is not None:
        return make_batch_loop(batches, batch_size=batch_size, progress=progress)
    if isinstance(calib, torch.Tensor) and calib.dtype == torch.long and calib.ndim == 2:
        tokens = calib
    else:
        from .data import calib_tokens

        tokens = calib_tokens(calib, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return make_forward_loop(tokens, batch_size=batch_size, progress=progress)
