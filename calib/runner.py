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
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import is_encoder_decoder

logger = logging.getLogger(__name__)

ForwardLoop = Callable[[nn.Module], None]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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


def resolve_forward_loop(model, calib=None, forward_loop=None, tokenizer=None, n_samples=32,
                         seq_len=512, batch_size=1, seed=0, progress=True):
    """A forward loop from either ``forward_loop`` or a calibration source (``calib``)."""
    if forward_loop is not None:
        if calib is not None:
            raise ValueError("pass either calib= or forward_loop=, not both")
        return forward_loop
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor) and calib.dtype == torch.long and calib.ndim == 2:
        tokens = calib
    else:
        from .data import calib_tokens

        tokens = calib_tokens(calib, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    return make_forward_loop(tokens, batch_size=batch_size, progress=progress)
