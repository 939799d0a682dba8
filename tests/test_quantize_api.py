"""quantize() on tiny Llama-, GPT-2- and OPT-style models; skips, summaries and bad input."""

import pytest
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.config import QuantConfig, QuantizerSpec, get_preset
from modelopt_lite.layers import LayerSelectionError
from modelopt_lite.nn import CalibrationError, is_quantized
from tiny_models import ALL, random_tokens


def _loop(tokens):
    def loop(model):
        for row in tokens:
            model(row[None])
    return loop


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("preset", ["int8_weight_only", "w8a8", "int4_weight_only"])
def test_quantize_wraps_linears_and_stays_close(arch, preset):
    model = ALL[arch]()
    tokens = random_tokens(n=2, seq=16)
    ref = _logits(model, tokens)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    cfg = mtl.get_preset(preset)
    if cfg.weight.granularity == "per_block":
        cfg = cfg.replace(weight=QuantizerSpec(num_bits=4, granularity="per_block",
                                               block_size=32, symmetric=False))
    mtl.quantize(model, cfg, forward_loop=_loop(random_tokens(n=4, seq=16)), progress=False)
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    assert quantized and not any("lm_head" in n or "embed" in n for n in quantized)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before  # no copies
    out = _logits(model, tokens)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.25 if "int4" in preset else 0.05)
    text = mtl.format_summary(model)
    assert "quantized" in text and quantized[0] in text


def test_indivisible_layer_is_skipped_with_reason_or_errors_when_named():
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=64))
    mtl.quantize(model, cfg, progress=False)
    assert not is_quantized(model[0]) and is_quantized(model[2])
    assert "in_features 96 is not divisible by block 64" in mtl.format_summary(model)

    named = nn.Sequential(nn.Linear(96, 64))
    with pytest.raises(LayerSelectionError, match="0: in_features 96 .* block 64.*Fix"):
        mtl.quantize(named, cfg.replace(targets=("0",)), progress=False)
    assert not is_quantized(named[0])

    fallback = nn.Sequential(nn.Linear(96, 64))
    mtl.quantize(fallback, cfg.replace(on_indivisible="per_channel"), progress=False)
    assert fallback[0].weight_quantizer.spec.granularity == "per_channel"


def test_every_layer_skipped_is_an_error_and_most_skipped_a_warning(caplog):
    """A block size that divides no layer's input dim quantizes nothing: an error that says
    which block would fit, not a silent no-op; more than half skipped: a warning."""
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=128))
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(160, 8))
    with pytest.raises(LayerSelectionError, match=r"nothing to quantize: 2 of 2 .*block 32 "
                                                  r"divides them all.*per_channel"):
        mtl.quantize(model, cfg, progress=False)
    assert not is_quantized(model[0]) and not is_quantized(model[2])
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 96), nn.Linear(96, 128),
                          nn.Linear(128, 8))
    with caplog.at_level("WARNING"):
        mtl.quantize(model, cfg.replace(weight=QuantizerSpec(
            num_bits=4, granularity="per_block", block_size=64)), progress=False)
    assert "2 of 4 matched layers would be skipped" not in caplog.text   # half: no warning
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(96, 96), nn.Linear(96, 64),
                          nn.Linear(64, 8))
    caplog.clear()
    with caplog.at_level("WARNING"):
        mtl.quantize(model, cfg.replace(weight=QuantizerSpec(
            num_bits=4, granularity="per_block", block_size=64)), progress=False)
    assert "3 of 4 matched layers would be skipped" in caplog.text and "block 32" in caplog.text
    assert is_quantized(model[3])


def test_no_matching_layers_names_what_exists():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(LayerSelectionError, match=r"matches no layer.*0 \(Linear\)"):
        mtl.quantize(model, mtl.get_preset("w8a8").replace(targets=("*attn*",)),
                     forward_loop=lambda m: None, progress=False)


def test_unsupported_dtype_and_model_left_unchanged():
    model = nn.Sequential(nn.Linear(8, 8).double())
    with pytest.raises(LayerSelectionError, match="float64 is not supported"):
        mtl.quantize(model, "int8_weight_only", progress=False)
    assert not is_quantized(model[0])


def test_static_activations_need_calibration_data():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CalibrationError, match="need calibration data"):
        mtl.quantize(model, "w8a8", progress=False)
    assert not is_quantized(model[0])


def test_nan_in_activations_names_the_layer_and_restores_the_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    with pytest.raises(CalibrationError, match="1.input: .*NaN/Inf"):
        mtl.quantize(model, "w8a8", forward_loop=lambda m: m(torch.randn(2, 8)), progress=False)
    assert not any(is_quantized(m) for m in model)


def test_double_quantize_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    mtl.quantize(model, "int8_weight_only", progress=False)
    with pytest.raises(ValueError, match="already has fake-quant layers"):
        mtl.quantize(model, "int8_weight_only", progress=False)


def test_conv2d_per_channel():
    # seeded: calibrated on 4 random images, the error on 2 others ranges 0.009-0.046 over
    # seeds (median 0.013), and an unseeded run inherits whatever the tests before it left
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 12, 12)
    ref = model(x)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(torch.randn(4, 3, 12, 12)),
                 progress=False)
    assert model[0].weight_quantizer.amax.shape == (8, 1)
    out = model(x)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_fake_quant_against_float64(dims):
    """Torch Conv1d / Conv3d: INT8 per-output-channel weights and a per-tensor INT8 input,
    against the same rounding written out in float64 (strides, padding, groups included)."""
    torch.manual_seed(0)
    conv = {1: nn.Conv1d(6, 8, 3, stride=2, padding=1, groups=2),
            3: nn.Conv3d(6, 8, (2, 3, 3), padding=(0, 1, 1), groups=2)}[dims]
    model = nn.Sequential(conv)
    shape = {1: (2, 6, 20), 3: (2, 6, 4, 7, 7)}[dims]
    calib = torch.randn(4, *shape[1:])
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(calib), progress=False)
    x = torch.randn(shape)
    w = conv.weight.detach().double()
    assert conv.input_quantizer.amax.item() == calib.abs().max().item()
    amax = conv.weight_quantizer.amax.double()   # one per output channel (the range that
    assert amax.shape == (8, 1)                  # puts both extremes on the [-128, 127] grid)
    ws = amax.reshape(-1, *[1] * (w.dim() - 1)) / 127
    xs = calib.double().abs().max() / 127
    xq = (x.double() / xs).round().clamp(-128, 127) * xs
    wq = (w / ws).round().clamp(-128, 127) * ws
    op = {1: torch.nn.functional.conv1d, 3: torch.nn.functional.conv3d}[dims]
    want = op(xq, wq, conv.bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        got = model(x).double()
    assert type(conv).__name__ == f"QuantConv{dims}d"
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_recurrent_mixer_conv_stays_float_conformer_conv_does_not():
    """A causal depthwise Conv1d (Mamba's mixer.conv1d) is left in float with the reason, as
    nvidia-modelopt does; named in targets it is quantized. A centred depthwise conv (a
    conformer's) and a plain Conv1d are quantized."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=64, state_size=8,
                                         num_hidden_layers=2)).eval()
    mtl.quantize(model, "w8a8", calib=random_tokens(n=2, seq=16), progress=False)
    rec = {r["name"]: r for r in model._modelopt_lite["layers"]}
    for i in range(2):
        assert "recurrent sequence mixer" in rec[f"backbone.layers.{i}.mixer.conv1d"]["skipped"]
        assert not is_quantized(model.backbone.layers[i].mixer.conv1d)
        assert is_quantized(model.backbone.layers[i].mixer.in_proj)

    def net():
        torch.manual_seed(0)   # causal depthwise, centred depthwise, plain
        return nn.Sequential(nn.Conv1d(8, 8, 4, padding=3, groups=8),
                             nn.Conv1d(8, 8, 5, padding=2, groups=8), nn.Conv1d(8, 4, 3))

    loop = lambda m: m(torch.randn(2, 8, 16))   # noqa: E731
    plain = mtl.quantize(net(), "w8a8", forward_loop=loop, progress=False)
    assert [is_quantized(m) for m in plain] == [False, True, True]
    named = mtl.quantize(net(), get_preset("w8a8").replace(targets=("*", "0")),
                         forward_loop=loop, progress=False)
    assert all(is_quantized(m) for m in named)


def test_named_int4_conv_follows_on_indivisible():
    """A conv opted into INT4 by name whose flattened input (in x kernel) the block does not
    divide: per_channel serves it per channel; skip (the default) raises, since it was asked
    for by name."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.Flatten(1), nn.Linear(160, 128))

    cfg = get_preset("int4_weight_only").replace(targets=("*", "0"))
    model = mtl.quantize(net(), cfg.replace(on_indivisible="per_channel"), progress=False)
    assert model[0].weight_quantizer.spec.granularity == "per_channel"
    assert model[0].weight_quantizer.spec.num_bits == 4
    with pytest.raises(LayerSelectionError, match=r"^0: in_features 48 is not divisible"):
        mtl.quantize(net(), cfg, progress=False)


@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_parametrized_linear_is_refused_by_weight_writing_algorithms(preset):
    """AWQ and SmoothQuant scale and round weights in place; a weight_norm'd linear would
    discard those writes (SmoothQuant's error went from 0.007 to 0.53 on a small MLP). They
    refuse it before any change; a preset that does not write weights takes it."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(256, 256)), nn.ReLU(), nn.Linear(256, 128))
    x = torch.randn(16, 256)
    with pytest.raises(ValueError, match=r"^0: its weight is computed by a parametrization"):
        mtl.quantize(model, preset, forward_loop=lambda m: m(x), progress=False)
    assert not any(is_quantized(m) for m in model.modules())
    ref = model(x)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(x), progress=False)
    assert is_quantized(model[0]) and ((model(x) - ref).norm() / ref.norm()).item() < 0.02


def test_unquantize_folds_an_explicit_smoothing_multiply():
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    ref = model(x)
    mtl.quantize(model, "int8_weight_only", progress=False)
    s = torch.rand(16) + 0.5
    with torch.no_grad():
        model[0].weight.div_(s)  # what a smoothing search leaves: W / s with x * s in front
    model[0].input_quantizer.set_pre_quant_scale(s)
    model[0].weight_quantizer.enabled = False
    assert torch.allclose(model(x), ref, atol=1e-5)
    mtl.unquantize(model)
    assert not is_quantized(model[0])
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_bad_batch_size_and_out_of_vocab_ids_are_clear_errors():
    from tiny_models import tiny_llama

    model = tiny_llama()
    vocab = model.get_input_embeddings().num_embeddings
    ok = torch.randint(0, vocab, (2, 8))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        mtl.quantize(model, "w8a8", calib=ok, batch_size=0, progress=False)
    bad = ok.clone()
    bad[1, 3] = vocab + 5
    with pytest.raises(ValueError, match=rf"span .*\.\.{vocab + 5}.*{vocab} rows.*tokenizer"):
        mtl.quantize(model, "w8a8", calib=bad, progress=False)
    assert not any(is_quantized(m) for m in model.modules())


@pytest.mark.parametrize("preset", ["w8a8", "int8_smoothquant", "int4_awq"])
def test_layers_calibration_never_calls_are_left_in_float_with_the_reason(preset):
    """Mamba's mixer reads ``dt_proj.weight`` directly (the layer's forward never runs), and a
    cross-attention gets no encoder states from text alone: no statistics, and a fake-quant
    forward that never runs would not quantize anything. They stay float, listed."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=128, state_size=8,
                                         num_hidden_layers=2, time_step_rank=128)).eval()
    tokens = random_tokens(n=2, seq=16)
    ref = _logits(model, tokens)
    mtl.quantize(model, preset, calib=random_tokens(n=4, seq=32), progress=False)
    layers = {r["name"]: r for r in model._modelopt_lite["layers"]}
    for i in range(2):
        assert "not called by the model's forward" in layers[f"backbone.layers.{i}.mixer.dt_proj"][
            "skipped"]
        assert not is_quantized(model.backbone.layers[i].mixer.dt_proj)
        assert is_quantized(model.backbone.layers[i].mixer.in_proj)
    assert "left in float" in mtl.format_summary(model)
    out = _logits(model, tokens)
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < 0.5


def test_layers_after_the_decoder_stack_stay_quantized_under_layer_by_layer_awq():
    """AWQ replays the decoder layers only: a head after them (a classifier's ``score``,
    OPT's ``project_out``) is not reached by any pass, which is not the same as never called."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=128, ffn_dim=256,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=256)).eval()
    mtl.quantize(opt, "int4_awq", calib=random_tokens(n=4, seq=32), progress=False)
    assert is_quantized(opt.model.decoder.project_out) and is_quantized(opt.model.decoder.project_in)
    clf = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_labels=128, pad_token_id=0)).eval()
    mtl.quantize(clf, "int4_awq", calib=random_tokens(n=4, seq=32).clamp(min=1), progress=False)
    assert is_quantized(clf.score)


@pytest.mark.parametrize("preset", ["w8a8", "int4_awq", "int8_smoothquant"])
def test_encoder_decoder_calibrates_its_decoder_on_the_text_shifted(preset):
    """T5 needs decoder inputs: the built-in loop gives the same text shifted right (pad first),
    so every linear of both stacks, cross-attention included, is calibrated; AWQ and SmoothQuant
    walk the encoder's layers, then the decoder's."""
    from modelopt_lite.calib.runner import decoder_inputs
    from tiny_models import tiny_t5

    model, float_model = tiny_t5(), tiny_t5()
    ids = random_tokens(n=2, seq=12, seed=3)
    dec = decoder_inputs(model, ids)["decoder_input_ids"]
    assert torch.equal(dec[:, 1:], ids[:, :-1]) and (dec[:, 0] == 0).all()
    assert decoder_inputs(ALL["llama"](), ids) == {}
    mtl.quantize(model, preset, calib=random_tokens(n=4, seq=16, seed=1), progress=False)
    rows = model._modelopt_lite["layers"]
    assert all(r["skipped"] is None for r in rows)
    names = {r["name"] for r in rows}
    assert {"encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.k",
            "decoder.block.1.layer.2.DenseReluDense.wo"} <= names
    if preset == "w8a8":
        for r in rows:
            iq = model.get_submodule(r["name"]).input_quantizer
            assert iq.amax is not None and torch.isfinite(iq.amax).all(), r["name"]
    else:   # layer by layer through the encoder, then the decoder on the processed encoder:
        # the T5 row folds the scales into both stacks' norms, and the cross-attention's key /
        # value (fed from outside the layer) keep an explicit multiply
        for norm in ("encoder.block.1.layer.0.layer_norm", "decoder.block.0.layer.0.layer_norm",
                     "decoder.block.1.layer.1.layer_norm"):
            assert not torch.equal(model.get_submodule(norm).weight,
                                   float_model.get_submodule(norm).weight), norm
        scaled = {r["name"] for r in rows
                  if model.get_submodule(r["name"]).input_quantizer.pre_quant_scale is not None}
        assert {"decoder.block.0.layer.1.EncDecAttention.k",
                "decoder.block.1.layer.1.EncDecAttention.v"} <= scaled
        assert "decoder.block.0.layer.0.SelfAttention.q" not in scaled
    with torch.no_grad():
        out = model(ids, decoder_input_ids=dec).logits
        want = float_model(ids, decoder_input_ids=dec).logits
    assert torch.isfinite(out).all() and ((out - want).norm() / want.norm()).item() < 0.5


def test_t5_layers_replay_on_the_position_biases_the_first_layer_computes():
    """T5's first layer computes the relative position biases and the stack hands them to the
    later layers: layer-by-layer replays see what a real forward gives them."""
    from modelopt_lite.calib.runner import decoder_inputs
    from modelopt_lite.calib.sequential import run_sequential
    from tiny_models import tiny_t5

    model = tiny_t5()
    ids = random_tokens(n=2, seq=12, seed=5)
    dec = decoder_inputs(model, ids)
    real = {}

    def keep(stack):
        def hook(module, args, kwargs):
            real.setdefault(stack, args)
        return hook

    hooks = [model.get_submodule(f"{s}.block.1").register_forward_pre_hook(
        keep(s), with_kwargs=True) for s in ("encoder", "decoder")]
    with torch.no_grad():
        model(ids, **dec)
    for h in hooks:
        h.remove()
    seen = {}

    def process(i, name, layer, inputs):
        if i == 1:
            seen[name.split(".")[0]] = inputs.entries[0][0]

    run_sequential(model, lambda m: m(ids, **dec), process, progress=False)
    for stack, positions in (("encoder", (0, 2)), ("decoder", (0, 2, 5))):
        for p in positions:   # hidden states, self-attention bias, cross-attention bias
            torch.testing.assert_close(seen[stack][p], real[stack][p], rtol=1e-4, atol=1e-5)


def test_layer_streaming_walks_an_encoder_decoder_held_in_memory():
    """A T5 in CPU memory streamed a layer at a time (encoder, then decoder) quantizes to
    exactly what the whole-model walk gives."""
    from modelopt_lite.calib.streaming import stream_layers
    from tiny_models import tiny_t5

    model, ref = tiny_t5(), tiny_t5()
    calib = random_tokens(2, 16, seed=1)
    mtl.quantize(ref, "int4_awq", calib=calib, progress=False)
    with stream_layers(model, device="cpu"):
        mtl.quantize(model, "int4_awq", calib=calib, progress=False)
    want = ref.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _lora_llama():
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_llama

    model = peft.get_peft_model(tiny_llama(hidden=128, inter=256), peft.LoraConfig(
        r=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_unmerged_peft_adapters_are_refused_by_folding_algorithms(preset):
    """An unmerged LoRA branch reads the same input as its base linear: AWQ / SmoothQuant
    folds into the layer feeding both would change it. Refused before any change, with the
    fix; after merge_and_unload the same preset runs."""
    import modelopt_lite as mtl
    from modelopt_lite.api import unmerged_adapters
    from tiny_models import random_tokens

    model = _lora_llama()
    tokens = random_tokens(4, 32, seed=1)
    with torch.no_grad():
        before = model(tokens).logits
    assert len(unmerged_adapters(model)) == 6
    with pytest.raises(ValueError, match=r"q_proj \(and 5 more\).*merge_and_unload"):
        mtl.quantize(model, preset, calib=tokens, progress=False)
    assert not mtl.layers.quant_modules(model)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    with model.disable_adapter():   # disabled adapters come back: refused as well
        with pytest.raises(ValueError, match="unmerged PEFT adapter"):
            mtl.quantize(model, preset, calib=tokens, progress=False)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    merged = model.merge_and_unload()
    assert not unmerged_adapters(merged)
    mtl.quantize(merged, preset, calib=tokens, progress=False)
    with torch.no_grad():
        after = merged(tokens).logits
    assert ((after - before).norm() / before.norm()).item() < 0.1


def test_unmerged_peft_adapters_run_with_presets_without_folds():
    import modelopt_lite as mtl
    from tiny_models import random_tokens

    model = _lora_llama()
    tokens = random_tokens(4, 32, seed=1)
    with torch.no_grad():
        before = model(tokens).logits
    mtl.quantize(model, "w8a8", calib=tokens, progress=False)
    with torch.no_grad():
        after = model(tokens).logits
    assert ((after - before).norm() / before.norm()).item() < 0.05
