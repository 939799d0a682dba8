"""The modelopt-lite CLI end to end on a tiny Hugging Face folder and text files."""

import pytest

from modelopt_lite.cli import build_parser, main
from test_eval import random_text, word_tokenizer
from tiny_models import tiny_llama, tiny_llava


@pytest.fixture
def tiny_folder(tmp_path):
    model = tiny_llama()
    model.config.vocab_size = 128
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (tmp_path / "calib.txt").write_text(random_text(3000, seed=1))
    (tmp_path / "test.txt").write_text(random_text(1000, seed=2))
    return tmp_path


def test_quantize_then_eval(tiny_folder, capsys):
    d = tiny_folder
    rc = main(["quantize", "--model", str(d / "tiny"), "--recipe", "int4_weight_only",
               "--calib", str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
               "--windows", "2", "--seq-len-eval", "64", "--eval-text", str(d / "test.txt"),
               "--out", str(d / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "14 layer(s) quantized" in out  # block 'auto' picks 64: every layer fits
    assert "float" in out and "int4_weight_only" in out
    assert (d / "out" / "modelopt_lite.json").exists()
    rc = main(["eval", "--model", str(d / "tiny"), "--checkpoint", str(d / "out"),
               "--windows", "2", "--seq-len-eval", "64", "--eval-text", str(d / "test.txt")])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-2].startswith("float") and str(d / "out") in lines[-1]


def test_bad_recipe_is_a_clear_error(tiny_folder, capsys):
    """A user error is one line on stderr and exit status 2; -v shows the traceback."""
    argv = ["quantize", "--model", str(tiny_folder / "tiny"), "--recipe", "int3", "--no-eval",
            "--calib", str(tiny_folder / "calib.txt")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("modelopt-lite quantize: error: ")
    assert "unknown preset 'int3'" in err[0]
    with pytest.raises(ValueError, match="unknown preset 'int3'"):
        main(["-v"] + argv)


def test_help_lists_subcommands():
    text = build_parser().format_help()
    for name in ("quantize", "eval"):
        assert name in text


def test_set_overrides_algorithm_fields_and_names_bad_keys(tiny_folder):
    from modelopt_lite.cli import _recipe
    from modelopt_lite.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(["quantize", "--recipe", "int8_smoothquant",
                              "--set", "gptq=false", "alpha=0.8"])
    cfg = _recipe(tiny_llama(), args)
    assert cfg.algorithm.gptq is False and cfg.algorithm.alpha == 0.8
    args = parser.parse_args(["quantize", "--set", "no_such=1"])
    with pytest.raises(ConfigError, match="no_such"):
        _recipe(tiny_llama(), args)


def test_block_size_auto_for_presets_a_file_keeps_its_own(tmp_path):
    """Presets get the block that fits the model ('auto'); a recipe file keeps its block unless
    --block-size is given; --block-size on a recipe without INT4 blocks is refused."""
    from modelopt_lite.cli import _recipe
    from modelopt_lite.config import ConfigError, QuantConfig, QuantizerSpec

    model = tiny_llama()   # hidden 64: block 128 fits no layer, 'auto' picks 64
    parser = build_parser()
    cfg = _recipe(model, parser.parse_args(["quantize", "--recipe", "int4_weight_only"]))
    assert cfg.weight.block_size == 64
    path = tmp_path / "r32.JSON"
    path.write_text(QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block",
                                                     block_size=32)).to_json())
    cfg = _recipe(model, parser.parse_args(["quantize", "--recipe", str(path)]))
    assert cfg.weight.block_size == 32
    for value, want in (("auto", 64), ("16", 16)):
        args = parser.parse_args(["quantize", "--recipe", str(path), "--block-size", value])
        assert _recipe(model, args).weight.block_size == want
    with pytest.raises(ConfigError, match="--block-size 64: recipe 'w8a8' quantizes weights "
                                          "per_channel, not per block"):
        _recipe(model, parser.parse_args(["quantize", "--recipe", "w8a8", "--block-size", "64"]))
    with pytest.raises(ConfigError, match="config file 'missing.json' does not exist"):
        _recipe(model, parser.parse_args(["quantize", "--recipe", "missing.json"]))
    with pytest.raises(ConfigError, match="has no algorithm settings.*'max'"):
        _recipe(model, parser.parse_args(["quantize", "--recipe", "int8_weight_only",
                                          "--set", "alpha=0.8"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--block-size", "abc"])


def test_bad_paths_fail_before_the_model_loads(tiny_folder, capsys, monkeypatch):
    import modelopt_lite.cli as cli

    monkeypatch.setattr(cli, "_load", lambda name: pytest.fail("the model was loaded"))
    (tiny_folder / "afile").write_text("x")
    for extra, want in ((["--calib", "nofile.txt"], "--calib nofile.txt: no such file"),
                        (["--eval-text", "nope.txt"], "--eval-text nope.txt: no such file"),
                        (["--out", str(tiny_folder / "afile")], "a file is there")):
        assert main(["quantize", "--model", str(tiny_folder / "tiny")] + extra) == 2
        assert want in capsys.readouterr().err


def test_quantize_a_multimodal_folder(tiny_folder, capsys):
    """A Llava folder (not a causal-LM class): loaded as image-text-to-text, its language
    model quantized on text, the vision tower left in float and listed."""
    d = tiny_folder
    tiny_llava().save_pretrained(d / "vlm")
    word_tokenizer().save_pretrained(d / "vlm")
    rc = main(["quantize", "--model", str(d / "vlm"), "--recipe", "int4_awq",
               "--calib", str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
               "--windows", "2", "--seq-len-eval", "64", "--eval-text", str(d / "test.txt")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "14 layer(s) quantized, 20 skipped" in out
    assert "outside the language model" in out


def test_quantize_an_encoder_decoder_folder(tiny_folder, capsys):
    """A T5 folder: loaded as seq2seq, both stacks quantized on the text (the decoder on it
    shifted right), saved; no perplexity table, which does not measure an encoder-decoder."""
    import modelopt_lite as mtl
    from tiny_models import tiny_t5

    d = tiny_folder
    tiny_t5().save_pretrained(d / "t5")
    word_tokenizer().save_pretrained(d / "t5")
    rc = main(["quantize", "--model", str(d / "t5"), "--recipe", "int8_smoothquant",
               "--calib", str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
               "--out", str(d / "t5-out")])
    out = capsys.readouterr().out
    assert rc == 0 and "no perplexity table" in out and "perplexity," not in out
    assert "32 layer(s) quantized" in out   # 2 x 6 encoder + 2 x 10 decoder linears
    fresh = tiny_t5()
    mtl.load(fresh, d / "t5-out")
    assert fresh.decoder.block[1].layer[1].EncDecAttention.k.input_quantizer.amax is not None
    with pytest.raises(ValueError, match="encoder-decoder.*Fix"):
        mtl.perplexity(fresh, word_tokenizer(), "a b c d " * 40, seq_len=16)


def test_quantize_a_classifier_folder(tiny_folder, capsys):
    """A BERT classifier folder loads as the class its config names (the head kept, not
    BERT's causal-LM class) and quantizes on the text; perplexity, which needs a language
    model head, is neither printed nor computable."""
    import modelopt_lite as mtl
    from tiny_models import tiny_encoder_classifier

    d = tiny_folder
    tiny_encoder_classifier("bert").save_pretrained(d / "bert")
    word_tokenizer().save_pretrained(d / "bert")
    rc = main(["quantize", "--model", str(d / "bert"), "--recipe", "w8a8",
               "--calib", str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
               "--out", str(d / "bert-out")])
    out = capsys.readouterr().out
    assert rc == 0 and "BertForSequenceClassification is not a language model" in out
    assert "perplexity," not in out and "classifier" in out
    fresh = tiny_encoder_classifier("bert")
    mtl.load(fresh, d / "bert-out")
    assert fresh.classifier.input_quantizer.amax is not None
    with pytest.raises(ValueError, match="no language-model head.*Fix"):
        mtl.perplexity(fresh, word_tokenizer(), "a b c d " * 40, seq_len=16)


def test_a_vision_folder_is_refused_with_the_python_route(tiny_folder, capsys):
    """The CLI calibrates on text: an image model's folder is refused before anything runs,
    naming what the model reads and the Python call that takes its batches."""
    from tiny_models import tiny_vit

    tiny_vit().save_pretrained(tiny_folder / "vit")
    assert main(["quantize", "--model", str(tiny_folder / "vit"), "--recipe", "w8a8"]) == 2
    err = capsys.readouterr().err
    assert "ViTForImageClassification reads pixel_values" in err and "calib=" in err


def test_device_map_offloads_and_gives_the_in_memory_checkpoint(tiny_folder, capsys):
    """--device-map with disk entries: the offloaded layers are calibrated one at a time and
    the saved checkpoint holds what quantizing in CPU memory saves."""
    import json

    from safetensors.torch import load_file

    d = tiny_folder
    common = ["quantize", "--model", str(d / "tiny"), "--recipe", "int4_awq", "--calib",
              str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32", "--windows", "1",
              "--seq-len-eval", "64", "--eval-text", str(d / "test.txt")]
    assert main(common + ["--out", str(d / "mem")]) == 0
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    assert main(common + ["--out", str(d / "map"), "--device-map", json.dumps(device_map)]) == 0
    out = capsys.readouterr().out
    ppl = [line.split()[1] for line in out.splitlines() if line.startswith("int4_awq")]
    assert len(ppl) == 2 and ppl[0] == ppl[1]

    def tensors(folder):
        return load_file(next(folder.glob("model-*.safetensors")))

    mem, mapped = tensors(d / "mem"), tensors(d / "map")
    assert mem.keys() == mapped.keys()
    assert all(mem[k].equal(mapped[k]) for k in mem)


def test_device_map_flags_are_checked(tiny_folder, capsys):
    base = ["quantize", "--model", str(tiny_folder / "tiny"), "--no-eval"]
    with pytest.raises(SystemExit, match="give --device-map"):
        main(base + ["--max-memory", '{"cpu": "1GiB"}'])
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(base + ["--device-map", "{model: cpu}"])
    with pytest.raises(SystemExit, match="--max-memory takes a JSON object"):
        main(base + ["--device-map", "auto", "--max-memory", "20GiB"])


def test_sparsify_an_encoder_decoder_folder_skips_perplexity(tiny_folder, capsys):
    """sparsify on a T5 folder prunes and saves; like quantize it leaves out the perplexity
    table, which perplexity() would refuse for an encoder-decoder."""
    from tiny_models import tiny_t5

    d = tiny_folder
    tiny_t5().save_pretrained(d / "t5")
    word_tokenizer().save_pretrained(d / "t5")
    rc = main(["sparsify", "--model", str(d / "t5"), "--method", "magnitude",
               "--out", str(d / "t5-sparse")])
    out = capsys.readouterr().out
    assert rc == 0 and "no perplexity table" in out and "perplexity," not in out
    assert (d / "t5-sparse" / "modelopt_lite.json").exists()


def test_export_hf_from_a_checkpoint(tiny_folder, capsys):
    """`export --format hf` writes a compressed-tensors folder from a modelopt_lite checkpoint
    and reads it back with transformers: the same logits as the fake-quant model."""
    pytest.importorskip("compressed_tensors")
    import json

    d = tiny_folder
    assert main(["quantize", "--model", str(d / "tiny"), "--recipe", "int4_awq",
                 "--calib", str(d / "calib.txt"), "--n-samples", "4", "--seq-len", "32",
                 "--windows", "1", "--seq-len-eval", "32", "--eval-text", str(d / "test.txt"),
                 "--out", str(d / "out")]) == 0
    capsys.readouterr()
    assert main(["export", "--format", "hf", "--model", str(d / "tiny"), "--checkpoint",
                 str(d / "out"), "--out", str(d / "hf")]) == 0
    out = capsys.readouterr().out
    rel = float(out.rsplit("relative", 1)[1].split()[0])
    assert rel < 1e-5, out
    qc = json.loads((d / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert (d / "hf" / "tokenizer_config.json").exists()


def test_export_hf_quantizes_with_awq_by_default(tiny_folder, capsys):
    pytest.importorskip("compressed_tensors")
    import json

    d = tiny_folder
    assert main(["export", "--format", "hf", "--model", str(d / "tiny"), "--n-samples", "2",
                 "--seq-len", "32", "--out", str(d / "hf")]) == 0
    groups = json.loads((d / "hf" / "config.json").read_text())["quantization_config"][
        "config_groups"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == [4]
    assert main(["export", "--format", "hf", "--model", str(d / "tiny"), "--opset", "19",
                 "--out", str(d / "hf2")]) == 2   # an ONNX option: a clear error, exit 2
    assert "ONNX options" in capsys.readouterr().err
