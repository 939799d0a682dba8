"""calib_tokens / calib_batches: every source type, seeding, BOS, and every error."""

import random

import pytest
import torch

from modelopt_lite.calib.data import CalibrationDataError, calib_batches, calib_tokens

WORDS = "the a cat dog bird sat ran on under mat tree roof big small red blue".split()
BOS = 1


def word_tokenizer(adds_bos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def texts(n=10, words=30, seed=None):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def stream_of(tok, items):
    return tok("\n\n".join(items), add_special_tokens=False).input_ids


def is_window(row, stream):
    n = len(row)
    return any(stream[i:i + n] == row for i in range(len(stream) - n + 1))


def test_strings_give_seeded_windows_with_bos():
    tok, items = word_tokenizer(), texts()
    out = calib_tokens(items, tok, n_samples=4, seq_len=16, seed=3)
    assert out.shape == (4, 16) and out.dtype == torch.long
    assert (out[:, 0] == BOS).all()
    stream = stream_of(tok, items)
    assert all(is_window(row[1:].tolist(), stream) for row in out)
    assert torch.equal(out, calib_tokens(tuple(items), tok, n_samples=4, seq_len=16, seed=3))
    assert not torch.equal(out, calib_tokens(items, tok, n_samples=4, seq_len=16, seed=4))


def test_windows_do_not_overlap_when_text_is_long_enough():
    ids = torch.arange(1000)
    out = calib_tokens(ids, n_samples=8, seq_len=100, seed=torch.seed() % 1000)
    starts = sorted(row[0].item() for row in out)
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:]))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in out)


def test_short_text_overlaps_with_warning(caplog):
    out = calib_tokens(torch.arange(50), n_samples=4, seq_len=20)
    assert out.shape == (4, 20)
    assert "overlap" in caplog.text


def test_tokenizer_without_default_bos_adds_none():
    tok, items = word_tokenizer(adds_bos=False), texts()
    out = calib_tokens(items, tok, n_samples=3, seq_len=10)
    assert all(is_window(row.tolist(), stream_of(tok, items)) for row in out)


def test_text_file(tmp_path):
    tok, items = word_tokenizer(), texts()
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(items), encoding="utf-8")
    expected = calib_tokens(items, tok, n_samples=2, seq_len=12)
    assert torch.equal(calib_tokens(path, tok, n_samples=2, seq_len=12), expected)
    assert torch.equal(calib_tokens(str(path), tok, n_samples=2, seq_len=12), expected)


def test_hf_dataset_text_column_and_only_string_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok, items = word_tokenizer(), texts()
    expected = calib_tokens(items, tok, n_samples=2, seq_len=12)
    by_text = datasets.Dataset.from_dict({"text": items, "id": list(range(len(items)))})
    by_other = datasets.Dataset.from_dict({"body": items, "id": list(range(len(items)))})
    assert torch.equal(calib_tokens(by_text, tok, n_samples=2, seq_len=12), expected)
    assert torch.equal(calib_tokens(by_other, tok, n_samples=2, seq_len=12), expected)


def test_load_dataset_text_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok, items = word_tokenizer(), texts()
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(items), encoding="utf-8")
    loaded = datasets.load_dataset("text", data_files=str(path), cache_dir=str(tmp_path / "c"))
    expected = calib_tokens(items, tok, n_samples=2, seq_len=12)
    assert torch.equal(calib_tokens(loaded, tok, n_samples=2, seq_len=12), expected)
    assert torch.equal(calib_tokens(loaded["train"], tok, n_samples=2, seq_len=12), expected)


def test_dataloader_of_dicts_is_used_as_given():
    ids = torch.randint(0, 100, (10, 20))
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    out = calib_tokens(loader, n_samples=6, seq_len=16)
    assert torch.equal(out, ids[:6, :16])


def test_iterables_of_tensors_and_tensor_datasets():
    ids = torch.randint(0, 100, (6, 8))
    assert torch.equal(calib_tokens([ids[:3], ids[3:]], n_samples=6, seq_len=8), ids)
    assert torch.equal(calib_tokens(iter([ids[0], ids[1]]), n_samples=2, seq_len=8), ids[:2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    assert torch.equal(calib_tokens(loader, n_samples=4, seq_len=8), ids[:4])


def test_fewer_rows_than_samples_warns(caplog):
    ids = torch.randint(0, 100, (3, 8))
    assert calib_tokens([ids], n_samples=5, seq_len=8).shape == (3, 8)
    assert "fewer than n_samples" in caplog.text


def test_tokenized_tensor_2d_rows_and_1d_stream():
    ids = torch.randint(0, 100, (4, 30))
    assert torch.equal(calib_tokens(ids, n_samples=2, seq_len=10), ids[:2, :10])
    stream = calib_tokens(torch.arange(200), word_tokenizer(), n_samples=2, seq_len=10)
    assert (stream[:, 0] == BOS).all() and stream.shape == (2, 10)


def test_calib_batches_splits_rows():
    batches = calib_batches(torch.arange(500), n_samples=7, seq_len=10, batch_size=3)
    assert [b.shape for b in batches] == [(3, 10), (3, 10), (1, 10)]
    assert torch.equal(torch.cat(batches), calib_tokens(torch.arange(500), n_samples=7, seq_len=10))


@pytest.mark.parametrize("source", [[], (), [""], ["", "  "], torch.empty(0, dtype=torch.long)])
def test_empty_source(source):
    with pytest.raises(CalibrationDataError, match="empty"):
        calib_tokens(source, word_tokenizer(), n_samples=2, seq_len=8)


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CalibrationDataError, match="empty"):
        calib_tokens(tmp_path / "e.txt", word_tokenizer(), n_samples=2, seq_len=8)


def test_text_shorter_than_one_sample_says_counts_and_fix():
    with pytest.raises(CalibrationDataError, match=r"has 3 tokens.*needs 15.*lower seq_len"):
        calib_tokens(["the cat sat"], word_tokenizer(), n_samples=2, seq_len=16)


def test_strings_without_tokenizer():
    with pytest.raises(CalibrationDataError, match="need a tokenizer"):
        calib_tokens(texts(), None)


@pytest.mark.parametrize("source", [42, 3.5, {"text": "x"}, b"bytes", None])
def test_unsupported_source_lists_supported(source):
    with pytest.raises(CalibrationDataError, match="unsupported.*list/tuple of strings"):
        calib_tokens(source, word_tokenizer())


def test_a_long_or_multiline_str_is_the_text_itself(tmp_path):
    """A str that cannot be a file path (multi-line, or longer than a path: a corpus such as
    wiki_text()'s) is calibrated on as text; a file's contents read the same."""
    text = " ".join(["the cat sat on the mat"] * 400)       # 8.8 KB, one line
    want = calib_tokens([text], word_tokenizer(), n_samples=2, seq_len=8)
    assert torch.equal(calib_tokens(text, word_tokenizer(), n_samples=2, seq_len=8), want)
    lines = "the cat sat\n" * 40
    assert torch.equal(calib_tokens(lines, word_tokenizer(), n_samples=2, seq_len=8),
                       calib_tokens([lines], word_tokenizer(), n_samples=2, seq_len=8))
    (tmp_path / "t.txt").write_text(text)
    assert torch.equal(calib_tokens(str(tmp_path / "t.txt"), word_tokenizer(), n_samples=2,
                                    seq_len=8), want)


def test_missing_file_suggests_a_list(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"pass \[text\]"):
        calib_tokens(str(tmp_path / "nope.txt"), word_tokenizer())


@pytest.mark.parametrize("batches, match", [
    ([{"ids": torch.zeros(2, 4, dtype=torch.long)}], "needs 'input_ids'"),
    ([torch.zeros(2, 4)], "unsupported calibration batch"),
    ([torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)], "different lengths"),
])
def test_bad_batches(batches, match):
    with pytest.raises(CalibrationDataError, match=match):
        calib_tokens(batches, n_samples=8, seq_len=8)


def test_bad_sizes_and_dtypes():
    with pytest.raises(CalibrationDataError, match="n_samples and seq_len must be >= 1"):
        calib_tokens(torch.arange(10), n_samples=0)
    with pytest.raises(CalibrationDataError, match="LongTensor"):
        calib_tokens(torch.zeros(10), n_samples=1, seq_len=4)
    with pytest.raises(CalibrationDataError, match="batch_size"):
        calib_batches(torch.arange(10), n_samples=1, seq_len=4, batch_size=0)


def test_error_is_a_value_error():
    assert issubclass(CalibrationDataError, ValueError)


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, modelopt_lite.calib.data, modelopt_lite.calib.embedded; "
            "print(any(m in sys.modules for m in ('transformers', 'datasets')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
