"""Perplexity over non-overlapping token windows, the project's accuracy measure.

The text is tokenized once without special tokens and cut into non-overlapping windows of
``seq_len`` tokens. Where the tokenizer uses a BOS token (adds one by default, as Gemma's
does; SmolLM2's has one but does not add it) the window is ``[bos] + seq_len - 1`` text
tokens. Every token after a window's first position is predicted, so a window scores
``seq_len - 1`` tokens either way; ppl = exp(mean NLL) over them, accumulated in float64.

Example:
    >>> from modelopt_lite.eval import perplexity
    >>> result = perplexity(model, tokenizer, text, seq_len=2048, windows=4)  # doctest: +SKIP
    >>> round(result.ppl, 2)                                                   # doctest: +SKIP
    12.8
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .calib.data import bos_to_add
from .models import is_encoder_decoder, is_generative

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is the mean over ``tokens`` predicted tokens in ``windows`` windows."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def not_a_language_model(model) -> str | None:
    """Why :func:`perplexity` does not measure ``model``: ``"an encoder-decoder"``, ``"not a
    language model"`` (no language-model head), or None when it does."""
    if is_encoder_decoder(model):
        return "an encoder-decoder"
    if getattr(model, "config", None) is not None and not is_generative(model):
        return "not a language model"
    return None


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, windows: int | None = None,
               add_bos: bool | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``windows`` windows of ``text`` (all when None).

    ``add_bos``: None prepends BOS where the tokenizer adds one by default; True always
    (the tokenizer must have a bos_token_id); False never.

    Example:
        >>> perplexity(model, tokenizer, wiki_text("test"), windows=4).ppl  # doctest: +SKIP
        12.80...
    """
    kind = not_a_language_model(model)
    if kind == "an encoder-decoder":
        raise ValueError(
            f"perplexity measures a language model predicting the next token from the tokens "
            f"before it; {type(model).__name__} is an encoder-decoder, whose decoder would see "
            f"the whole window through its encoder. Fix: measure it on its task (translation, "
            f"summarisation, transcription) with its own metric")
    if kind:
        raise ValueError(
            f"perplexity measures a language model predicting the next token; "
            f"{type(model).__name__} has no language-model head (a classifier or an encoder). "
            f"Fix: measure it on its task with its own metric")
    bos = window_bos(tokenizer, add_bos)
    chunks = text_windows(token_ids(tokenizer, text), seq_len - (bos is not None), windows)
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress):
            ids = chunk if bos is None else torch.cat([torch.tensor([bos]), chunk])
            nll_sum, n = window_nll(model, ids.to(device))
            total, count = total + nll_sum, count + n
    nll = total / count
    logger.info("perplexity %.4f over %d tokens in %d windows of %d", math.exp(nll), count,
                len(chunks), seq_len)
    return PerplexityResult(math.exp(nll), nll, count, len(chunks), seq_len)


def window_bos(tokenizer, add_bos: bool | None) -> int | None:
    """The BOS id to prepend to each window, or None."""
    if add_bos is None:
        return bos_to_add(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id: "
                         "pass add_bos=None or False, or set tokenizer.bos_token")
    return bos if add_bos else None


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens, as a 1-D LongTensor."""
    if not text:
        raise ValueError("perplexity needs a non-empty text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def text_windows(ids: torch.Tensor, length: int, windows: int | None) -> list[torch.Tensor]:
    """The first ``windows`` non-overlapping slices of ``length`` tokens (a short tail is dropped)."""
    if length < 1:
        raise ValueError("seq_len must leave at least one text token per window (seq_len >= 2 with BOS)")
    available = ids.numel() // length
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens but one window needs {length}: "
                         "lower seq_len or give a longer text")
    if windows is not None and windows > available:
        logger.warning("asked for %d windows but the text holds only %d; using %d",
                       windows, available, available)
    n = available if windows is None else min(windows, available)
    if n < 1:
        raise ValueError(f"windows must be >= 1 (got {windows})")
    return list(ids[: n * length].view(n, length))


def window_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over the window's shifted tokens (float64), and their count."""
    out = model(ids.unsqueeze(0))
    logits = (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out)
    logits, targets = logits[0, :-1].float(), ids[1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.logsumexp(logits, dim=-1).double() - picked.double()
    return nll.sum().item(), targets.numel()


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
