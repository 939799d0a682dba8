"""Multimodal models (Llava, Gemma 3 with its vision tower): the language model's decoder layers
are the stack calibration runs through, its architecture row folds the scales, and the encoders
and projectors of other inputs stay in float unless named."""

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.layers import plan_layers
from modelopt_lite.models import (ARCHITECTURES, find_decoder_layers, get_arch,
                                  other_input_paths)
from modelopt_lite.nn import is_quantized
from tiny_models import IMAGE_TOKEN, random_tokens, tiny_gemma3_vlm, tiny_git, tiny_llava

VLM = {"llava": (tiny_llava, 16), "gemma3": (tiny_gemma3_vlm, 4)}   # builder, tokens per image


def _text(n=2, seq=24, seed=0):
    return random_tokens(n, seq, seed=seed) % (IMAGE_TOKEN - 3)   # no image or marker tokens


def _with_image(arch, seed=0):
    """input_ids with one image's placeholder tokens, and the image."""
    ids = _text(1, 20, seed)
    n = VLM[arch][1]
    ids = torch.cat([ids[:, :4], torch.full((1, n), IMAGE_TOKEN), ids[:, 4:]], 1)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=g))


def _outside(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.startswith("model.language_model.")
            and n != "lm_head"}


@pytest.mark.parametrize("arch", sorted(VLM))
def test_the_language_models_layers_are_the_decoder_stack(arch):
    model = VLM[arch][0]()   # 3 vision blocks, 2 text blocks: the longest list is the tower's
    path, layers = find_decoder_layers(model)
    assert path == "model.language_model.layers"
    assert layers is model.model.language_model.layers
    text_type = model.config.text_config.model_type
    assert get_arch(model) is ARCHITECTURES[text_type if arch == "llava" else "gemma3"]


@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant", "w8a8"])
@pytest.mark.parametrize("arch", sorted(VLM))
def test_text_calibration_quantizes_the_language_model_and_keeps_the_tower(arch, preset):
    model = VLM[arch][0]()
    float_model = VLM[arch][0]()
    towers = {n: m.weight.detach().clone() for n, m in _outside(model).items()}
    norms = [layer.input_layernorm.weight.detach().clone()
             for layer in model.model.language_model.layers]
    mtl.quantize(model, preset, calib=_text(4), progress=False)

    rows = {r["name"]: r for r in model._modelopt_lite["layers"]}
    lm = [n for n in rows if n.startswith("model.language_model.")]
    assert len(lm) == 14 and all(rows[n]["skipped"] is None for n in lm)
    assert all(is_quantized(model.get_submodule(n)) for n in lm)
    assert set(towers) <= set(rows)
    for name, weight in towers.items():
        assert "outside the language model" in rows[name]["skipped"]
        module = model.get_submodule(name)
        assert not is_quantized(module) and torch.equal(module.weight, weight)
    if preset != "w8a8":   # the text model's row folds the smoothing into its norms
        assert all(not torch.equal(layer.input_layernorm.weight, w)
                   for layer, w in zip(model.model.language_model.layers, norms))
        for n in lm:   # norm-fed linears: folded, no explicit multiply (the fallback's way)
            if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                iq = getattr(model.get_submodule(n), "input_quantizer", None)
                assert getattr(iq, "pre_quant_scale", None) is None, n
    # an image still flows through the float tower; the text stream is quantized, not broken
    batch = _with_image(arch, seed=3)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
        ref = float_model.model.get_image_features(pixel_values=batch["pixel_values"])
        out, want = model(**batch).logits, float_model(**batch).logits
    feats, ref = [getattr(f, "pooler_output", f) for f in (feats, ref)]
    feats, ref = [torch.cat(list(f)) if isinstance(f, (list, tuple)) else f for f in (feats, ref)]
    torch.testing.assert_close(feats, ref, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    assert ((out - want).norm() / want.norm()).item() < 0.5


@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_image_calibration_through_a_forward_loop(preset):
    """Image and text batches through the user's loop: the float tower runs in the capture pass
    and the language layers calibrate on image and text positions alike."""
    model, float_model = tiny_llava(), tiny_llava()
    batches = [_with_image("llava", seed=s) for s in range(3)]

    def loop(m):
        for b in batches:
            m(**b)

    mtl.quantize(model, preset, forward_loop=loop, progress=False)
    rows = {r["name"]: r for r in model._modelopt_lite["layers"]}
    assert sum(r["skipped"] is None for r in rows.values()) == 14
    with torch.no_grad():
        out, want = model(**batches[0]).logits, float_model(**batches[0]).logits
    assert torch.isfinite(out).all() and ((out - want).norm() / want.norm()).item() < 0.5


def test_targets_opt_the_tower_in():
    model = tiny_llava()
    weight_only = QuantConfig(weight=QuantizerSpec(num_bits=8))
    plans = {p.name: p for p in plan_layers(model, weight_only)}
    assert "outside the language model" in plans["model.multi_modal_projector.linear_1"].skipped
    named = QuantConfig(weight=QuantizerSpec(num_bits=8), targets=("*vision_tower*",))
    plans = plan_layers(model, named)
    assert plans and all(p.name.startswith("model.vision_tower.") and p.skipped is None
                         for p in plans)
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(num_bits=8),
                                    targets=("*vision_tower*", "*projector*")))
    assert all(is_quantized(m) for m in _outside(model).values())


def test_star_plus_a_name_adds_that_layer_and_keeps_the_rest_of_the_tower():
    """targets=("*", name): the language model as usual, plus the one layer named; the rest
    of the tower and the projector stay in float (naming is how a skipped layer is opted in,
    and must not opt every other input's encoder in with it)."""
    model = tiny_llava()
    one = "model.multi_modal_projector.linear_1"
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=8), targets=("*", one))
    plans = {p.name: p for p in plan_layers(model, cfg)}
    assert plans[one].skipped is None
    assert "outside the language model" in plans["model.multi_modal_projector.linear_2"].skipped
    tower = [n for n in plans if n.startswith("model.vision_tower.")]
    assert tower and all("outside the language model" in plans[n].skipped for n in tower)
    assert all(plans[n].skipped is None for n in plans if n.startswith("model.language_model."))


def test_sparsify_keeps_the_tower_dense():
    model = tiny_llava()
    mtl.sparsify(model, "2:4", method="sparsegpt", calib=_text(2, 16), progress=False)
    for name, module in _outside(model).items():
        assert (module.weight != 0).all(), name
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert (q.reshape(-1, 4) == 0).sum(1).ge(2).all()


def test_save_and_load_a_quantized_multimodal_model(tmp_path):
    model = tiny_llava()
    mtl.quantize(model, "int4_awq", calib=_text(4), progress=False)
    mtl.save(model, tmp_path / "ckpt")
    fresh = mtl.load(tiny_llava(seed=1), tmp_path / "ckpt")
    batch = _with_image("llava", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_an_image_encoder_beside_the_text_layers(preset):
    """GIT: no text sub-config; the image encoder (built from ``vision_config``) has more blocks
    than the text stack beside it, and the text layers receive their cache positionally (a
    replayed cache would grow on every call)."""
    model, float_model = tiny_git(), tiny_git()
    assert other_input_paths(model) == ["git.image_encoder"]
    assert find_decoder_layers(model)[0] == "git.encoder.layer"
    mtl.quantize(model, preset, calib=_text(4), progress=False)
    rows = {r["name"]: r for r in model._modelopt_lite["layers"]}
    text = [n for n in rows if n.startswith("git.encoder.layer.")]
    assert len(text) == 12 and all(rows[n]["skipped"] is None for n in text)
    assert all("encoder of another input" in r["skipped"]
               for n, r in rows.items() if n.startswith("git.image_encoder."))
    ids = _text(1, 16, seed=7)
    with torch.no_grad():
        out, want = model(ids).logits, float_model(ids).logits
    assert torch.isfinite(out).all() and ((out - want).norm() / want.norm()).item() < 0.5


def test_a_text_model_built_from_sub_configs_is_not_multimodal():
    """BLT builds its byte-level text blocks from sub-configs (encoder / global / decoder /
    patcher): none of them is an encoder of another input, so every linear is planned."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("blt"))
    assert other_input_paths(model) == []
    plans = plan_layers(model, QuantConfig(weight=QuantizerSpec(num_bits=8)))
    assert plans and all(p.skipped is None for p in plans)
