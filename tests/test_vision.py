"""Models beyond decoder-only text: image and waveform batches as calibration data, AWQ and
SmoothQuant on a plain CNN (processed whole: no stack of blocks; convolutions keep max
ranges) and on hierarchical and speech models, and the ONNX export of vision, speech and
headless encoder models."""

import onnx
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import modelopt_lite as mtl
from modelopt_lite.config import get_preset
from modelopt_lite.export import export_onnx
from modelopt_lite.export.verify import compare_with_torch
from modelopt_lite.nn import is_quantized
from tiny_models import random_tokens, tiny_cnn, tiny_encoder_classifier, tiny_vit

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _input_ranges(model) -> dict:
    return {n: m.input_quantizer.amax.clone() for n, m in model.named_modules()
            if is_quantized(m) and m.input_quantizer.enabled}


@pytest.mark.parametrize("form", ["tensor", "dict", "loader", "dataset"])
def test_image_batches_calibrate_as_a_forward_loop_would(form):
    """calib= takes images as a tensor (split by batch_size), a processor's dict of
    pixel_values, a DataLoader of (images, labels) or a datasets.Dataset with an image and a
    label column; each calibrates the activation ranges a hand-written forward loop over the
    same images gives."""
    import datasets

    calib = {"tensor": IMAGES, "dict": {"pixel_values": IMAGES},
             "loader": DataLoader(TensorDataset(IMAGES, torch.zeros(8)), batch_size=4),
             "dataset": datasets.Dataset.from_dict({"pixel_values": IMAGES.numpy(),
                                                    "label": [0] * 8})}[form]
    got = mtl.quantize(tiny_vit(), "w8a8", calib=calib, batch_size=4, progress=False)
    ref = mtl.quantize(tiny_vit(), "w8a8", progress=False,
                       forward_loop=lambda m: [m(pixel_values=x) for x in IMAGES.split(4)])
    ranges, expected = _input_ranges(got), _input_ranges(ref)
    assert len(expected) == 13 and ranges.keys() == expected.keys()
    assert all(torch.equal(ranges[n], expected[n]) for n in expected)


def test_image_batches_beyond_n_samples_are_not_used():
    loader = DataLoader(TensorDataset(IMAGES, torch.zeros(8)), batch_size=2)
    seen = []
    model = tiny_vit()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(1), with_kwargs=True)
    mtl.quantize(model, "w8a8", calib=loader, n_samples=4, progress=False)
    assert len(seen) == 2   # two batches of two hold the 4 samples asked for


@pytest.mark.parametrize("preset,baseline", [("int4_awq", "int4_weight_only_sym"),
                                             ("int8_smoothquant", "w8a8")])
def test_awq_and_smoothquant_on_a_plain_cnn(preset, baseline):
    """A model without a stack of blocks is calibrated whole. Its linears get their
    activation-aware input scales (AWQ; SmoothQuant and its GPTQ rounding); the convolutions,
    whose input channels are not the last axis, keep max ranges (INT8) or stay in float
    (INT4 block weights are for linears). The result is closer to the
    float model than the plain max-calibrated baseline of the same format."""
    x = IMAGES[:, :, :16, :16]
    with torch.no_grad():
        ref = tiny_cnn()(x)

    def error(config):
        model = mtl.quantize(tiny_cnn(), get_preset(config, block_size=32) if "int4" in config
                             else config, calib=x, batch_size=4, progress=False)
        with torch.no_grad():
            return model, ((model(x) - ref).norm() / ref.norm()).item()

    model, ours = error(preset)
    scaled = [n for n, m in model.named_modules()
              if is_quantized(m) and m.input_quantizer.pre_quant_scale is not None]
    assert scaled == ["6", "8"]   # the two linears, not the convolutions
    convs = [m for m in (model[0], model[2]) if is_quantized(m)]
    if "int4" in preset:   # INT4 block weights are for linears: the convs stay float, listed
        rec = {r["name"]: r for r in model._modelopt_lite["layers"]}
        assert not convs and "INT4 block weights" in rec["0"]["skipped"]
    else:
        assert len(convs) == 2 and all(c.weight_quantizer.amax is not None for c in convs)
    assert ours < error(baseline)[1]


def test_vision_classifier_exports_its_pixel_values(tmp_path):
    """ViT: pixel_values are the graph input with a symbolic image count, class logits the
    output; onnxruntime computes what PyTorch does (weight-only INT4: to float rounding)."""
    model = mtl.quantize(tiny_vit(), get_preset("int4_weight_only_sym", block_size=32),
                         progress=False)
    inputs = {"pixel_values": IMAGES[:2]}
    result = export_onnx(model, inputs, tmp_path / "vit.onnx")
    m = onnx.load(str(result.path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}
    assert dims == {"pixel_values": ["images", 3, 32, 32]}
    assert [o.name for o in m.graph.output] == ["logits"]
    for x in (IMAGES[:2], IMAGES[:5]):
        assert compare_with_torch(model, {"pixel_values": x}, result.path)["rel"] < 1e-5
    # a tensor given positionally is the forward's first input, pixel_values
    again = export_onnx(model, IMAGES[:2], tmp_path / "vit_positional.onnx")
    assert [i.name for i in onnx.load(str(again.path)).graph.input] == ["pixel_values"]
    assert compare_with_torch(model, IMAGES[:3], again.path)["rel"] < 1e-5


def test_headless_encoder_exports_its_hidden_states(tmp_path):
    """A model without a head (BertModel, as embedding models are) gives its last hidden
    state, named so, [batch, seq, hidden], both text axes symbolic, and its pooled output."""
    classifier = tiny_encoder_classifier("bert")
    model = mtl.quantize(classifier.bert, get_preset("int4_weight_only_sym", block_size=32),
                         progress=False)
    ids = random_tokens(2, 12, seed=5)
    result = export_onnx(model, ids, tmp_path / "bert.onnx")
    m = onnx.load(str(result.path))
    assert [o.name for o in m.graph.output] == ["last_hidden_state", "pooler_output"]
    out = m.graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch", "seq", 128]
    for x in (ids, random_tokens(3, 7, seed=6)):
        assert compare_with_torch(model, x, result.path)["rel"] < 1e-5


def test_layer_stack_is_a_list_of_blocks_with_linears():
    """MarkupLM keeps fifty XPath embedding tables in a ModuleList, more entries than its
    encoder has layers: the stack layer-by-layer calibration walks is the encoder's, and AWQ
    runs on it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from modelopt_lite.models import find_decoder_layers

    cfg = AutoConfig.for_model("markuplm", vocab_size=128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    assert len(model.markuplm.embeddings.xpath_embeddings.xpath_tag_sub_embeddings) > 2
    assert find_decoder_layers(model)[0] == "markuplm.encoder.layer"
    mtl.quantize(model, get_preset("int4_awq", block_size=32), calib=random_tokens(4, 16),
                 progress=False)
    assert model._awq_scales and all(k.startswith("markuplm.encoder.layer.")
                                     for k in model._awq_scales)


class _ConvNamedFc2(torch.nn.Module):
    """A 1 x 1 convolution named like a linear that SmoothQuant rotates by default (SwiftFormer
    and EfficientFormer name their convolutional MLPs' layers fc1 / fc2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Conv2d(3, 32, 1)
        self.fc2 = torch.nn.Conv2d(32, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.fc2(self.fc1(x).relu()).mean((2, 3)))


def test_default_rotation_passes_over_a_conv_named_like_a_linear():
    from modelopt_lite.algorithms.smoothquant import SmoothQuantConfig
    from modelopt_lite.config import ConfigError

    x = IMAGES[:, :, :8, :8]
    model = mtl.quantize(_ConvNamedFc2(), "int8_smoothquant", calib=x, progress=False)
    assert model.fc2.input_quantizer.rotation is None and is_quantized(model.fc2)
    explicit = get_preset("int8_smoothquant").replace(algorithm=SmoothQuantConfig(rotate=("fc2",)))
    with pytest.raises(ConfigError, match=r"fc2.input: rotate applies to linear layers"):
        mtl.quantize(_ConvNamedFc2(), explicit, calib=x, progress=False)


def test_encoder_with_an_input_of_its_own_exports_it_as_given(tmp_path):
    """LayoutLM reads word boxes (``bbox``) beside the text: its calibration batches carry
    them, and the export keeps them as a graph input (the inputs as given) instead of
    refusing an input the logits wrapper does not know."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model("layoutlm", vocab_size=128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    ids = random_tokens(2, 12, seed=5)
    bbox = torch.randint(0, 500, (2, 12, 4), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "bbox": bbox.sort(-1).values}
    mtl.quantize(model, get_preset("int4_weight_only_sym", block_size=32), calib=[batch],
                 progress=False)
    result = export_onnx(model, batch, tmp_path / "layoutlm.onnx")
    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["input_ids", "bbox"]
    assert compare_with_torch(model, batch, result.path)["rel"] < 1e-5


def test_hierarchical_model_walks_every_stage():
    """PVT-v2: a list of stages whose widths differ, each with its own blocks. The walk takes
    each stage's blocks in turn (not the list of stages, whose blocks' inputs change shape
    from one to the next), so SmoothQuant smooths the linears of every stage."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from modelopt_lite.models import layer_stacks

    cfg = AutoConfig.for_model("pvt_v2", image_size=32, depths=[1, 1, 1, 1], num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(cfg).eval()
    assert [p for p, _ in layer_stacks(model)] == [
        f"pvt_v2.encoder.layers.{j}.blocks" for j in range(4)]
    with torch.no_grad():
        ref = model(IMAGES).logits
    mtl.quantize(model, "int8_smoothquant", calib=IMAGES, batch_size=4, progress=False)
    report = model._smoothquant_report
    assert {k.split(".")[3] for k in report} == {"0", "1", "2", "3"}   # every stage
    with torch.no_grad():
        out = model(IMAGES).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def _tiny_speech(model_type, seed=0):
    """A 2-layer wav2vec2-style CTC model (``wav2vec2``, ``hubert``, ``wavlm``) on raw
    waveforms, with a 2-convolution feature encoder (stride 10)."""
    from transformers import AutoConfig, AutoModelForCTC

    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
                               conv_stride=(5, 2), conv_kernel=(10, 3),
                               num_feat_extract_layers=2, vocab_size=32)
    torch.manual_seed(seed)
    return AutoModelForCTC.from_config(cfg).eval()


WAVES = torch.randn(4, 1600, generator=torch.Generator().manual_seed(0))


def test_speech_model_exports_its_waveform_with_a_symbolic_length(tmp_path):
    """wav2vec2 CTC: calibrated on a waveform tensor; the graph takes ``input_values`` with
    symbolic batch and sample axes, and onnxruntime computes what PyTorch does on another
    length (weight-only INT4: to float rounding)."""
    model = _tiny_speech("wav2vec2")
    mtl.quantize(model, get_preset("int4_weight_only_sym", block_size=32), progress=False)
    result = export_onnx(model, WAVES[:2], tmp_path / "w2v.onnx")
    m = onnx.load(str(result.path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}
    assert dims == {"input_values": ["batch", "samples"]}
    other = torch.randn(3, 2400, generator=torch.Generator().manual_seed(1))
    assert compare_with_torch(model, other, result.path)["rel"] < 1e-5


def test_speech_stack_is_the_encoder_not_the_positional_convs():
    """data2vec-audio's positional embedding is a list of five identical Conv1d blocks; the
    two-layer encoder, not that list, is the stack the layer walk calibrates."""
    from modelopt_lite.models import layer_stacks

    model = _tiny_speech("data2vec-audio")
    stacks = [(path, len(stack)) for path, stack in layer_stacks(model)]
    assert stacks == [("data2vec_audio.encoder.layers", 2)]


def test_layer_walk_hands_on_wavlm_position_bias():
    """WavLM's first layer computes the relative position bias and passes it to the others
    by keyword: the layer-by-layer walk carries it, so each layer's captured input is the
    model's own hidden state there, and SmoothQuant runs."""
    from modelopt_lite.calib.runner import make_batch_loop
    from modelopt_lite.calib.sequential import run_sequential

    model = _tiny_speech("wavlm")
    with torch.no_grad():
        states = model(WAVES, output_hidden_states=True).hidden_states
    seen = {}
    run_sequential(model, make_batch_loop([WAVES], batch_size=4, progress=False),
                   lambda i, name, layer, inputs: seen.setdefault(i, inputs.hidden(0).clone()),
                   progress=False)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], states[1], rtol=1e-5, atol=1e-5)
    mtl.quantize(model, "int8_smoothquant", calib=WAVES, batch_size=2, progress=False)


def test_question_answering_model_exports_both_logits(tmp_path):
    """BERT for extractive QA (SQuAD, a classic TensorRT INT8 model) answers with start and
    end logits: both are graph outputs, named so, and each matches PyTorch in onnxruntime."""
    import numpy as np
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from modelopt_lite.export.verify import onnx_feeds, session

    cfg = AutoConfig.for_model("bert", vocab_size=128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(cfg).eval()
    mtl.quantize(model, "w8a8", calib=random_tokens(4, 16), progress=False)
    ids = random_tokens(2, 12, seed=5)
    result = export_onnx(model, ids, tmp_path / "qa.onnx")
    sess = session(result.path)
    assert [o.name for o in sess.get_outputs()] == ["start_logits", "end_logits"]
    got = dict(zip(["start_logits", "end_logits"], sess.run(None, onnx_feeds(sess, model, ids))))
    with torch.no_grad():
        ref = model(ids)
    for name, value in got.items():   # 8-bit activations: the rounding-flip bound
        want = ref[name].numpy()
        assert np.linalg.norm(value - want) / np.linalg.norm(want) < 2e-2, name


def test_multiple_choice_model_exports_choices_and_sequence_axes(tmp_path):
    """BERT for multiple choice reads [batch, choices, seq] token ids: all three axes are
    symbolic (the sequence is not taken for the choices), and another shape runs."""
    from transformers import AutoConfig, AutoModelForMultipleChoice

    cfg = AutoConfig.for_model("bert", vocab_size=128, hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForMultipleChoice.from_config(cfg).eval()
    mtl.quantize(model, get_preset("int4_weight_only_sym", block_size=32), progress=False)
    ids = random_tokens(8, 12, seed=5).reshape(2, 4, 12)
    result = export_onnx(model, ids, tmp_path / "mc.onnx")
    graph = onnx.load(str(result.path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == [
        "batch", "choices", "seq"]
    other = random_tokens(6, 9, seed=6).reshape(3, 2, 9)
    assert compare_with_torch(model, other, result.path)["rel"] < 1e-5
