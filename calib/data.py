"""Calibration sources -> token batches of ``n_samples x seq_len``, seeded.

Texts (a list of strings, a text file, a ``datasets.Dataset``) are joined with a blank line,
tokenized once, and ``n_samples`` windows are drawn at seeded random offsets, without overlap
when the text is long enough. Already tokenized sources (a LongTensor, a DataLoader or any
iterable of batches) are used as given, never re-tokenized.

Example:
    >>> from modelopt_lite.calib.data import calib_tokens
    >>> tokens = calib_tokens(["a long text ...", "another ..."], tokenizer, 8, 256)  # doctest: +SKIP
    >>> tokens.shape                                                                    # doctest: +SKIP
    torch.Size([8, 256])
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUPPORTED = ("a list/tuple of strings, a text file path (str or pathlib.Path), a datasets.Dataset "
             "(or a DatasetDict with one split), a DataLoader or iterable of batches (dicts with "
             "'input_ids', or tensors), or a LongTensor of token ids")


class CalibrationDataError(ValueError):
    """Calibration data that cannot give the requested token batches."""


def calib_tokens(source, tokenizer=None, n_samples: int = 32, seq_len: int = 512,
                 seed: int = 0) -> torch.Tensor:
    """Turn a calibration source into a LongTensor of shape ``[n_samples, seq_len]``.

    Example:
        >>> calib_tokens(torch.arange(100), n_samples=2, seq_len=10).shape
        torch.Size([2, 10])
    """
    check_sizes(n_samples, seq_len)
    if isinstance(source, torch.Tensor):
        return tensor_tokens(source, tokenizer, n_samples, seq_len, seed)
    texts = source_texts(source)
    if texts is None:
        return batch_rows(source, n_samples, seq_len)
    stream = tokenize(texts, tokenizer)
    return draw_windows(stream, bos_to_add(tokenizer), n_samples, seq_len, seed)


def calib_batches(source, tokenizer=None, n_samples: int = 32, seq_len: int = 512,
                  batch_size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``calib_tokens`` split into batches of ``batch_size`` rows (the last may be smaller).

    Example:
        >>> [b.shape[0] for b in calib_batches(torch.arange(100), None, 5, 10, batch_size=2)]
        [2, 2, 1]
    """
    if batch_size < 1:
        raise CalibrationDataError(f"batch_size must be >= 1 (got {batch_size})")
    return list(calib_tokens(source, tokenizer, n_samples, seq_len, seed).split(batch_size))


def check_sizes(n_samples: int, seq_len: int) -> None:
    """Reject non-positive sample counts and lengths."""
    if n_samples < 1 or seq_len < 1:
        raise CalibrationDataError(
            f"n_samples and seq_len must be >= 1 (got n_samples={n_samples}, seq_len={seq_len})")


def tensor_tokens(ids: torch.Tensor, tokenizer, n_samples: int, seq_len: int,
                  seed: int) -> torch.Tensor:
    """A 1-D tensor is a token stream to draw windows from; a 2-D tensor is rows as given."""
    if ids.dtype != torch.long:
        raise CalibrationDataError(f"token ids must be a LongTensor (got dtype {ids.dtype})")
    if ids.dim() == 2:
        return batch_rows([ids], n_samples, seq_len)
    if ids.dim() != 1:
        raise CalibrationDataError(f"token ids must be 1-D (a stream) or 2-D (rows); got {ids.dim()}-D")
    if ids.numel() == 0:
        raise CalibrationDataError("the calibration token tensor is empty")
    return draw_windows(ids, bos_to_add(tokenizer), n_samples, seq_len, seed)


def source_texts(source) -> list[str] | None:
    """The texts of a text source, or None for a source of token batches."""
    if isinstance(source, str) and _is_text(source):
        return [source]
    if isinstance(source, (str, Path)):
        return [read_text_file(Path(source))]
    if is_dataset(source):
        return dataset_texts(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise CalibrationDataError(f"the calibration source is an empty {type(source).__name__}")
        if all(isinstance(item, str) for item in source):
            return list(source)
        return None
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        return None
    raise CalibrationDataError(f"unsupported calibration source {type(source).__name__}: "
                               f"use {SUPPORTED}")


def _is_text(source: str) -> bool:
    """Whether a str source is the text itself rather than a file path: not an existing file,
    and multi-line or longer than any path (e.g. ``wiki_text()``'s corpus). A short one-line
    string stays a path, so that a mistyped file name is an error, not a calibration text."""
    return ("\n" in source or len(source) > 1024) and not _is_file(Path(source))


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name no file can have (too long, or a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_text_file(path: Path) -> str:
    """Read a UTF-8 text file; a short one-line string that is not a file is an error (wrap
    texts in a list)."""
    if not _is_file(path):
        raise CalibrationDataError(f"calibration file '{path}' does not exist: a str source is read "
                                   "as a file path; to calibrate on the string itself pass [text]")
    return path.read_text(encoding="utf-8")


def is_dataset(source) -> bool:
    """True for a ``datasets.Dataset`` or ``DatasetDict``, without importing ``datasets``."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, (datasets.Dataset, datasets.DatasetDict))


def dataset_texts(dataset) -> list[str]:
    """Texts of the "text" column, or of the only string column; a DatasetDict needs one split."""
    if not hasattr(dataset, "features"):
        if len(dataset) != 1:
            raise CalibrationDataError(f"the DatasetDict has splits {list(dataset)}: pass one, "
                                       "e.g. dataset['train']")
        dataset = next(iter(dataset.values()))
    return list(dataset[text_column(dataset)])


def text_column(dataset) -> str:
    """Name of the text column: "text", else the only string column."""
    if "text" in dataset.column_names:
        return "text"
    strings = [name for name, feature in dataset.features.items()
               if getattr(feature, "dtype", None) in ("string", "large_string")]
    if len(strings) != 1:
        raise CalibrationDataError(f"cannot tell the text column among {dataset.column_names}: "
                                   "name it 'text' (dataset.rename_column(old, 'text'))")
    return strings[0]


def tokenize(texts: list[str], tokenizer) -> torch.Tensor:
    """Join texts with a blank line and tokenize them once, without special tokens."""
    text = "\n\n".join(t for t in texts if t)
    if not text.strip():
        raise CalibrationDataError("the calibration text is empty: give at least one non-empty text")
    if tokenizer is None:
        raise CalibrationDataError("calibration texts need a tokenizer: pass tokenizer=..., "
                                   "or pass token ids (a LongTensor or a DataLoader of input_ids)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer has one and adds it by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if len(ids) and ids[0] == bos else None


def draw_windows(stream: torch.Tensor, bos: int | None, n_samples: int, seq_len: int,
                 seed: int) -> torch.Tensor:
    """``n_samples`` windows of the stream at seeded offsets, each ``[bos] + text`` when bos is set."""
    length = seq_len - (bos is not None)
    if length < 1 or stream.numel() < length:
        raise CalibrationDataError(
            f"the calibration text has {stream.numel()} tokens but one sample of seq_len={seq_len} "
            f"needs {max(length, 1)} text tokens{' plus BOS' if bos is not None else ''}: "
            "lower seq_len or give more text")
    starts = window_starts(stream.numel(), length, n_samples, seed)
    rows = torch.stack([stream[s: s + length] for s in starts.tolist()])
    if bos is not None:
        rows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def window_starts(total: int, length: int, n: int, seed: int) -> torch.Tensor:
    """Seeded random window offsets, non-overlapping when ``n * length <= total``.

    Example:
        >>> window_starts(100, 10, 3, seed=0).tolist()  # sorted, at least 10 apart
        [15, 28, 63]
    """
    gen = torch.Generator().manual_seed(seed)
    slack = total - n * length
    if slack >= 0:
        gaps = torch.randint(0, slack + 1, (n,), generator=gen).sort().values
        return gaps + torch.arange(n) * length
    logger.warning("the calibration text has %d tokens, fewer than %d samples x %d: "
                   "samples overlap", total, n, length)
    return torch.randint(0, total - length + 1, (n,), generator=gen)


def batch_rows(batches, n_samples: int, seq_len: int) -> torch.Tensor:
    """Rows of already tokenized batches, concatenated: the first n_samples, cut to seq_len."""
    rows, width = [], None
    for batch in batches:
        ids = batch_ids(batch)[:, :seq_len]
        if width is not None and ids.shape[1] != width:
            raise CalibrationDataError(f"token batches have different lengths ({width} and "
                                       f"{ids.shape[1]}): pad or cut them to one length")
        width = ids.shape[1]
        rows.append(ids)
        if sum(r.shape[0] for r in rows) >= n_samples:
            break
    if not rows or width == 0:
        raise CalibrationDataError("the calibration batches are empty: give at least one batch of tokens")
    out = torch.cat(rows)[:n_samples]
    if out.shape[0] < n_samples:
        logger.warning("calibration batches hold %d rows, fewer than n_samples=%d; using %d",
                       out.shape[0], n_samples, out.shape[0])
    return out


def batch_ids(batch) -> torch.Tensor:
    """The input_ids of one batch (a dict with "input_ids", a tensor, or a tuple led by one) as 2-D."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise CalibrationDataError(f"a calibration batch dict needs 'input_ids' (keys: {list(batch)})")
        batch = batch["input_ids"]
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.long or batch.dim() not in (1, 2):
        raise CalibrationDataError(f"unsupported calibration batch {type(batch).__name__}: a batch is "
                                   "a dict with 'input_ids', or a 1-D/2-D LongTensor")
    return batch if batch.dim() == 2 else batch.unsqueeze(0)
