"""perplexity() against an independent float64 reference on a tiny Llama and a word tokenizer."""

import math
import random

import pytest
import torch

from modelopt_lite.eval import PerplexityResult, perplexity
from tiny_models import tiny_llama

WORDS = ("the a cat dog bird sat ran flew on under over mat tree roof far near quickly slowly "
         "and but then big small red blue green old new").split()


def word_tokenizer(bos=True, adds_bos=True):
    """A word-level tokenizer; with ``adds_bos`` it prepends <s> by default (as Gemma's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos and adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<s>" if bos else None)


def random_text(n_words, seed=None):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def reference_nll(model, windows):
    """Sum and count of -log p over shifted tokens, every window, all in float64."""
    model64 = tiny_llama().double().eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model64(torch.tensor([ids])).logits[0].double()
            for pos in range(len(ids) - 1):
                logp = logits[pos] - torch.logsumexp(logits[pos], dim=0)
                total -= logp[ids[pos + 1]].item()
                count += 1
    return total, count


def test_matches_float64_reference_with_bos():
    model, tok = tiny_llama(), word_tokenizer()
    text = random_text(200)
    ids = tok(text, add_special_tokens=False).input_ids
    windows = [[1] + ids[i * 15:(i + 1) * 15] for i in range(3)]
    total, count = reference_nll(model, windows)
    res = perplexity(model, tok, text, seq_len=16, windows=3, progress=False)
    assert res.tokens == count == 3 * 15
    assert (res.windows, res.seq_len) == (3, 16)
    assert res.nll == pytest.approx(total / count, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_matches_float64_reference_without_bos():
    model, tok = tiny_llama(), word_tokenizer(bos=False)
    text = random_text(100)
    ids = tok(text, add_special_tokens=False).input_ids
    total, count = reference_nll(model, [ids[:16], ids[16:32]])
    res = perplexity(model, tok, text, seq_len=16, windows=2, progress=False)
    assert res.tokens == count == 2 * 15
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bos_token_not_added_by_default_is_not_prepended():
    model, tok = tiny_llama(), word_tokenizer(adds_bos=False)
    text = random_text(100)
    ids = tok(text, add_special_tokens=False).input_ids
    total, count = reference_nll(model, [ids[:16]])
    res = perplexity(model, tok, text, seq_len=16, windows=1, progress=False)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    forced = perplexity(model, tok, text, seq_len=16, windows=1, add_bos=True, progress=False)
    total, count = reference_nll(model, [[1] + ids[:15]])
    assert forced.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_add_bos_false_skips_bos():
    model, tok = tiny_llama(), word_tokenizer()
    text = random_text(100)
    ids = tok(text, add_special_tokens=False).input_ids
    total, count = reference_nll(model, [ids[:16]])
    res = perplexity(model, tok, text, seq_len=16, windows=1, add_bos=False, progress=False)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_all_windows_by_default_and_tail_dropped():
    res = perplexity(tiny_llama(), word_tokenizer(), random_text(100), seq_len=11, progress=False)
    assert (res.windows, res.tokens) == (10, 100)


def test_too_many_windows_uses_what_the_text_holds(caplog):
    res = perplexity(tiny_llama(), word_tokenizer(), random_text(50), seq_len=11, windows=9,
                     progress=False)
    assert res.windows == 5
    assert "holds only 5" in caplog.text


def test_result_is_frozen():
    res = PerplexityResult(ppl=2.0, nll=math.log(2.0), tokens=10, windows=1, seq_len=11)
    with pytest.raises(AttributeError):
        res.ppl = 3.0


def test_uniform_model_gives_vocab_size_perplexity():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return (torch.zeros(ids.shape + (37,)),)

    res = perplexity(Uniform(), word_tokenizer(), random_text(40), seq_len=8, progress=False)
    assert res.ppl == pytest.approx(37.0, rel=1e-6)


@pytest.mark.parametrize("text, seq_len, match", [
    ("", 16, "non-empty"),
    ("the cat", 16, "has 2 tokens but one window needs 15"),
    ("the cat sat", 1, "at least one text token"),
])
def test_errors(text, seq_len, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_llama(), word_tokenizer(), text, seq_len=seq_len, progress=False)


def test_add_bos_true_without_bos_token_is_an_error():
    with pytest.raises(ValueError, match="no bos_token_id"):
        perplexity(tiny_llama(), word_tokenizer(bos=False), random_text(40), seq_len=8,
                   add_bos=True, progress=False)
