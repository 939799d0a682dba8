"""export_hf: compressed-tensors checkpoints read back by transformers (with the
compressed-tensors package) give the fake-quant model's logits; tensors match the package's own
compressor; what cannot be written is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.config import QuantConfig, QuantizerSpec, get_preset  # noqa: E402
from modelopt_lite.export.hf import HFExportError, export_hf, pack_int32  # noqa: E402
from tiny_models import random_tokens, tiny_llama  # noqa: E402


def _quantized(config, **kw):
    model = tiny_llama(hidden=128, inter=256, kv_heads=2, **kw)   # grouped-query attention
    mtl.quantize(model, config, calib=random_tokens(n=4, seq=32, seed=1), progress=False)
    return model


def _reloaded_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(ids).logits


def _smoothquant_without_multiplies():
    from modelopt_lite.algorithms.smoothquant import SmoothQuantConfig

    return get_preset("int8_smoothquant").replace(
        algorithm=SmoothQuantConfig(rotate=(), smooth_unfoldable=False))


@pytest.mark.parametrize("preset", ["int4_awq", "int4_weight_only_sym", "int8_weight_only",
                                    "w8a8", "smoothquant"])
def test_transformers_loads_what_the_fake_quant_model_computes(tmp_path, preset):
    config = _smoothquant_without_multiplies() if preset == "smoothquant" else preset
    model = _quantized(config)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["format"] == ("int-quantized" if preset in ("w8a8", "smoothquant")
                               else "pack-quantized")
    loaded, got = _reloaded_logits(tmp_path, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert hasattr(model.model.layers[0].self_attn.q_proj, "weight_quantizer")   # unchanged


def test_asymmetric_integer_zero_points_match_the_packages_compressor(tmp_path):
    """Asymmetric INT4 with integer zero points: every layer's tensors equal what
    compressed-tensors' own compressor writes from the same weight, scale and zero point, and
    its decompression gives the fake-quant weight. (transformers' loader in compressed-tensors
    0.20 sizes packed zero points wrongly, for its own checkpoints too, so the model is read
    tensor by tensor here.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=64, symmetric=False,
                         integer_zero=True)
    model = _quantized(QuantConfig(weight=spec))
    export_hf(model, tmp_path)
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(f))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=64))
    for name, layer in mtl.layers.quant_modules(model):
        w = layer.weight.detach()
        scale, zero = layer.weight_quantizer.scale_zero(w)
        theirs = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale,
             "weight_zero_point": (zero - 8).round().to(torch.int8)}, scheme)
        ours = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert set(ours) == {"weight_packed", "weight_scale", "weight_zero_point",
                             "weight_shape"}, name
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(ours[key], theirs[key]), (name, key)
        weight = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
        torch.testing.assert_close(weight, layer.weight_quantizer(w), rtol=0, atol=1e-6)


def test_a_per_channel_fallback_gets_its_own_group(tmp_path):
    """Layers whose width the block does not divide fall back to per-channel ranges; each
    scheme is then a config group naming its layers, and the checkpoint still loads exactly."""
    cfg = get_preset("int4_weight_only_sym").replace(on_indivisible="per_channel")
    model = tiny_llama(hidden=128, inter=192, kv_heads=2)   # down_proj reads 192
    mtl.quantize(model, cfg, progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())[
        "quantization_config"]["config_groups"]
    by_strategy = {g["weights"]["strategy"]: g["targets"] for g in groups.values()}
    assert by_strategy["channel"] == ["model.layers.0.mlp.down_proj",
                                      "model.layers.1.mlp.down_proj"]
    assert len(by_strategy["group"]) == 12
    torch.testing.assert_close(_reloaded_logits(tmp_path, ids)[1], want, rtol=1e-5, atol=1e-5)


def test_dynamic_activations_load_as_per_token():
    """w8a8_dynamic writes per-token dynamic activations. compressed-tensors' own fake quant
    divides a token's range by 127.5 where modelopt_lite (and vLLM's INT8 kernels) divide by
    127, so the reloaded model is close, not equal."""
    import tempfile

    model = _quantized("w8a8_dynamic")
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        qc = json.loads(open(f"{folder}/config.json").read())["quantization_config"]
        acts = qc["config_groups"]["group_0"]["input_activations"]
        assert acts["dynamic"] and acts["strategy"] == "token"
        got = _reloaded_logits(folder, ids)[1]
    assert ((got - want).norm() / want.norm()).item() < 0.05


@pytest.mark.parametrize("case,match", [
    ("fractional_zero", "integer_zero=True"),
    ("rotated", "rotate=()"),
    ("deployed", "before deploy"),
    ("float", "quantize it first"),
])
def test_refusals_name_the_fix_and_write_nothing(tmp_path, case, match):
    if case == "fractional_zero":
        model = _quantized("int4_weight_only")
    elif case == "rotated":
        model = _quantized("int8_smoothquant")
    elif case == "deployed":
        model = _quantized("int4_awq")
        mtl.deploy(model)
    else:
        model = tiny_llama()
    out = tmp_path / "out"
    with pytest.raises(HFExportError, match=match):
        export_hf(model, out)
    assert not out.exists()


def test_not_a_hugging_face_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    mtl.quantize(model, "int8_weight_only", progress=False)
    with pytest.raises(HFExportError, match="PreTrainedModel"):
        export_hf(model, tmp_path / "out")


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_int32_against_a_bit_loop(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (5, 40), generator=g).to(torch.int8)   # 40: a padded row
    packed = pack_int32(codes, bits)
    per = 32 // bits
    assert packed.shape == (5, -(-40 // per)) and packed.dtype == torch.int32
    for r in range(5):
        for i in range(40):
            word = int(packed[r, i // per]) & 0xFFFFFFFF
            u = (word >> (bits * (i % per))) & (2 ** bits - 1)
            assert u - 2 ** (bits - 1) == int(codes[r, i])


def test_a_quantized_head_tied_to_the_embedding_is_untied(tmp_path, caplog):
    """Gemma 3 ties its head to the embedding; with the head quantized and the embedding not,
    the checkpoint unties them (as the fake-quant model computes) and reloads exactly."""
    from tiny_models import tiny_gemma3

    model = tiny_gemma3()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = get_preset("int4_weight_only_sym", block_size=32).replace(exclude=("*embed*",))
    mtl.quantize(model, cfg, progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" not in config["quantization_config"]["ignore"]
    assert model.config.tie_word_embeddings   # the model's own config is unchanged
    loaded, got = _reloaded_logits(tmp_path, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_per_tensor_weights_are_written_per_channel(tmp_path):
    """A per-tensor range is written as per-channel scales, every row the same (vLLM's
    weight-only kernels take channel or group scales); the reload is exact."""
    model = _quantized(QuantConfig(weight=QuantizerSpec(num_bits=8, granularity="per_tensor")))
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    weights = json.loads((tmp_path / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "channel"
    torch.testing.assert_close(_reloaded_logits(tmp_path, ids)[1], want, rtol=1e-5, atol=1e-5)


def test_a_vision_language_model_with_a_float_attention_head(tmp_path):
    """Gemma 3's SigLIP tower has an nn.MultiheadAttention pooling head, unpacked by quantize()
    but left in float with the tower: it is written back packed, under the model's names."""
    from transformers import Gemma3ForConditionalGeneration

    from tiny_models import tiny_gemma3_vlm

    model = tiny_gemma3_vlm()
    mtl.quantize(model, "int4_awq", calib=random_tokens(n=4, seq=32, seed=1), progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    loaded = Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    head = [m for n, m in loaded.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert head and head[0].in_proj_weight is not None


@pytest.mark.parametrize("preset,tol", [("int4_awq", 2e-2), ("w8a8", 5e-2)])
def test_half_precision_reload_is_within_a_scale_rounding(preset, tol):
    """In bfloat16, weight-only scales are stored in the model's dtype and transformers rounds
    the W8A8 ones to it on load: the reloaded weights (and activation grid) may move by one
    rounding step, so the logits are close, not equal."""
    import tempfile

    model = tiny_llama(hidden=128, inter=256, kv_heads=2).to(torch.bfloat16)
    mtl.quantize(model, preset, calib=random_tokens(n=4, seq=32, seed=1), progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits.float()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        got = _reloaded_logits(folder, ids)[1].float()
    assert ((got - want).norm() / want.norm()).item() < tol


def test_weights_off_and_split_fusions(tmp_path, caplog):
    """Activations-only quantization is refused as such; a q/k/v family split between schemes
    exports (transformers loads it) with a warning about vLLM's fused layers."""
    model = tiny_llama(hidden=128, inter=256, kv_heads=2)
    mtl.quantize(model, QuantConfig(weight=None,
                                    input=QuantizerSpec(num_bits=8, granularity="per_tensor")),
                 calib=random_tokens(n=2, seq=16, seed=1), progress=False)
    with pytest.raises(HFExportError, match="activations only"):
        export_hf(model, tmp_path / "a")
    model = _quantized(get_preset("int4_awq").replace(exclude=("*k_proj", "*lm_head*")))
    with caplog.at_level("WARNING"):
        export_hf(model, tmp_path / "b")
    assert "vLLM fuses" in caplog.text


def test_written_in_another_dtype(tmp_path):
    """dtype=bfloat16 writes a float32-calibrated model's float tensors and weight-only scales
    in bfloat16 (W8A8 scales stay float32), and says so in config.json."""
    from safetensors.torch import load_file

    model = _quantized("int4_awq")
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path, dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32
    loaded, got = _reloaded_logits(tmp_path, ids)
    assert loaded.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
    with pytest.raises(HFExportError, match="float16, bfloat16 or float32"):
        export_hf(model, tmp_path / "x", dtype="int8")


def test_a_second_export_replaces_the_first_and_a_failure_keeps_it(tmp_path, monkeypatch):
    """Written into a staging folder, then moved in: re-exporting with fewer shards removes the
    stale ones (other files stay), and a failure while writing leaves the earlier export."""
    model = _quantized("int4_awq")
    export_hf(model, tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    (tmp_path / "README.md").write_text("mine")
    export_hf(model, tmp_path)
    assert sorted(f.name for f in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]
    assert (tmp_path / "README.md").read_text() == "mine"
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_awq_on_an_architecture_without_a_table_row(tmp_path):
    """Phi has no row in the architecture table, so AWQ scales each linear's input with an
    explicit multiply, which the format cannot carry (refused, naming fold_only); with
    AWQConfig(fold_only=True) the linears are clipped and GPTQ-rounded unscaled and the
    checkpoint reloads exactly."""
    import dataclasses

    from transformers import PhiConfig, PhiForCausalLM

    def tiny_phi():
        torch.manual_seed(0)
        return PhiForCausalLM(PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4)).eval()

    calib = random_tokens(n=4, seq=32, seed=1)
    cfg = get_preset("int4_awq", block_size=32)
    model = tiny_phi()
    mtl.quantize(model, cfg, calib=calib, progress=False)
    with pytest.raises(HFExportError, match="fold_only=True"):
        export_hf(model, tmp_path / "refused")
    model = tiny_phi()
    mtl.quantize(model, cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, fold_only=True)),
                 calib=calib, progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path / "ok")
    torch.testing.assert_close(_reloaded_logits(tmp_path / "ok", ids)[1], want, rtol=1e-5,
                               atol=1e-5)


def test_a_qat_trained_model_exports_with_its_learned_ranges(tmp_path):
    """After a few QAT steps (learned ranges), the written codes and scales are the trained
    fake-quant model's: the reload gives its logits."""
    from modelopt_lite.qat import prepare_qat

    model = tiny_llama(hidden=128, inter=256, kv_heads=2)
    prepare_qat(model, "w8a8", calib=random_tokens(n=4, seq=32, seed=1), progress=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    for step in range(3):
        ids = random_tokens(n=2, seq=16, seed=3 + step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    torch.testing.assert_close(_reloaded_logits(tmp_path, ids)[1], want, rtol=1e-5, atol=1e-5)


def test_a_sparse_quantized_model_keeps_its_zeros(tmp_path):
    """2:4 sparsity then AWQ INT4: the folder is written dense, every group of four still has
    at most two nonzero weights after the reload, and the logits are the fake-quant model's."""
    from modelopt_lite.sparsity import sparsify

    model = tiny_llama(hidden=128, inter=256, kv_heads=2)
    sparsify(model, "2:4", "magnitude")
    mtl.quantize(model, "int4_awq", calib=random_tokens(n=4, seq=32, seed=1), progress=False)
    ids = random_tokens(n=2, seq=16, seed=2)
    with torch.no_grad():
        want = model(ids).logits
    export_hf(model, tmp_path)
    loaded, got = _reloaded_logits(tmp_path, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = loaded.model.layers[1].mlp.down_proj.weight
    assert ((w.view(-1, 4) != 0).sum(-1) <= 2).all()
