"""SmoothQuant W8A8: exact folds, alpha search, outlier taming, static vs dynamic activations."""

import copy
import dataclasses

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.algorithms.smoothquant import (ROTATED_CLIP_GRID, SmoothQuantConfig,
                                                  output_error, smoothing_scales)
from modelopt_lite.calib.runner import make_forward_loop
from modelopt_lite.config import ConfigError, QuantConfig
from modelopt_lite.layers import quant_modules
from modelopt_lite.models import block_post_norm, find_decoder_layers
from tiny_models import random_tokens, tiny_gemma3, tiny_llama

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def sq_config(alpha=None, dynamic=False, grid=GRID, batches=8, gptq=False):
    """The preset with these search settings; GPTQ rounding off unless asked, so that the
    float model after the fold and the search's objective can be checked exactly."""
    base = mtl.get_preset("int8_smoothquant_dynamic" if dynamic else "int8_smoothquant")
    return base.replace(algorithm=SmoothQuantConfig(alpha=alpha, alpha_grid=grid,
                                                    search_batches=batches, gptq=gptq))


def quantized(model, cfg, tokens):
    model = copy.deepcopy(model)
    return mtl.quantize(model, cfg, forward_loop=make_forward_loop(tokens, 1, progress=False),
                        progress=False)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.double()


def rel_err(out, ref):
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def set_quantizers(model, enabled):
    for _, m in quant_modules(model):
        m.weight_quantizer.enabled = m.input_quantizer.enabled = enabled


def plant_outliers(model, factor=60.0, channels=(3, 17)):
    """Scale a few norm channels up and the consuming columns down: same float model, but
    activation outliers that per-tensor INT8 cannot represent next to the small channels."""
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        for layer in layers:
            for norm, linears in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                parent = layer.self_attn if linears[0] == "q_proj" else layer.mlp
                for c in channels:
                    norm.weight[c] *= factor
                    for n in linears:
                        getattr(parent, n).weight[:, c] /= factor
    return model


def test_smoothing_scales_formula():
    x, w = torch.rand(32) * 10 + 0.1, torch.rand(32) + 0.05
    for alpha in (0.0, 0.3, 0.5, 1.0):
        ref = x.double() ** alpha / w.double() ** (1 - alpha)
        assert torch.allclose(smoothing_scales(x, w, alpha).double(), ref, rtol=1e-5)
    # migration: X / s and W * s have the same max ratio at alpha = 0.5
    s = smoothing_scales(x, w, 0.5)
    assert torch.allclose(x / s, w * s, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_smoothing_then_fold_leaves_float_model_unchanged(make):
    model = make()
    tokens = random_tokens(4, 24)
    ref = logits(model, tokens)
    q = quantized(model, sq_config(alpha=0.7), tokens)
    set_quantizers(q, False)  # float again, but with the smoothing folded / as explicit multiply
    _, layers = find_decoder_layers(q)
    changed = (layers[0].input_layernorm.weight - find_decoder_layers(model)[1][0]
               .input_layernorm.weight).abs().max()
    assert changed > 1e-3  # the fold did change the weights
    assert rel_err(logits(q, tokens), ref) < 1e-10  # float32 round-off only
    set_quantizers(q, True)
    assert rel_err(logits(q, tokens), ref) > 1e-7  # the comparison can fail


def _attn_error(model, float_model, tokens):
    """Layer 0 self_attn output error with only q/k/v quantized (the search's first objective)."""
    _, layers = find_decoder_layers(model)
    set_quantizers(model, False)
    for n in ("q_proj", "k_proj", "v_proj"):
        m = getattr(layers[0].self_attn, n)
        m.weight_quantizer.enabled = m.input_quantizer.enabled = True
    outs = {}

    def grab(key):
        return lambda mod, args, out: outs.setdefault(key, []).append(out[0])

    h1 = layers[0].self_attn.register_forward_hook(grab("q"))
    h2 = find_decoder_layers(float_model)[1][0].self_attn.register_forward_hook(grab("f"))
    logits(model, tokens), logits(float_model, tokens)
    h1.remove(), h2.remove()
    return rel_err(torch.cat(outs["q"]).double(), torch.cat(outs["f"]).double())


def test_alpha_search_never_worse_than_half_on_its_objective():
    model = plant_outliers(tiny_llama(seed=3), factor=20.0)
    tokens = random_tokens(4, 32, seed=7)
    searched = quantized(model, sq_config(batches=4), tokens)
    fixed = quantized(model, sq_config(alpha=0.5), tokens)
    report = searched._smoothquant_report
    assert all(r["error"] <= r["errors"][0.5] for r in report.values())
    assert any(r["alpha"] != 0.5 for r in report.values())
    # measured independently on the final model: layer 0's q/k/v group
    assert _attn_error(searched, model, tokens) <= _attn_error(fixed, model, tokens) * 1.001


def test_searched_activation_clip_scales_the_calibrated_range():
    model = plant_outliers(tiny_llama(seed=3), factor=20.0)
    tokens = random_tokens(4, 32, seed=8)
    cfg = sq_config(batches=4)
    cfg = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm,
                                                    clip_grid=(1.0, 0.9, 0.8, 0.6)))
    clipped = quantized(model, cfg, tokens)
    plain = quantized(model, cfg.replace(algorithm=dataclasses.replace(
        cfg.algorithm, clip_grid=(1.0,))), tokens)
    report = clipped._smoothquant_report
    assert all(r["clip"] in cfg.algorithm.clip_grid for r in report.values())
    assert all(r["error"] <= r["errors"][r["alpha"]] for r in report.values())
    assert all(r["clip"] == 1.0 for r in plain._smoothquant_report.values())
    layer_c = find_decoder_layers(clipped)[1][0]
    layer_p = find_decoder_layers(plain)[1][0]
    key = next(k for k in report if k.startswith(find_decoder_layers(clipped)[0] + ".0."))
    for n in report[key]["linears"]:  # same alphas in both runs; the range differs by clip
        assert plain._smoothquant_report[key]["alpha"] == report[key]["alpha"]
        got = layer_c.get_submodule(n).input_quantizer.amax
        want = layer_p.get_submodule(n).input_quantizer.amax * report[key]["clip"]
        assert torch.allclose(got, want, rtol=1e-5)


def test_post_norm_is_named_for_sandwich_norm_blocks_only():
    gemma, llama = tiny_gemma3(), tiny_llama()
    g0, l0 = find_decoder_layers(gemma)[1][0], find_decoder_layers(llama)[1][0]
    assert block_post_norm(gemma, g0, "mlp.down_proj") is g0.post_feedforward_layernorm
    assert block_post_norm(gemma, g0, "self_attn.o_proj") is g0.post_attention_layernorm
    assert block_post_norm(gemma, g0, "self_attn") is g0.post_attention_layernorm
    assert block_post_norm(llama, l0, "mlp.down_proj") is None


def test_output_error_after_a_post_norm_matches_float64():
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(2, 5, 64, generator=g) * torch.rand(2, 5, 1, generator=g) * 10
            for _ in range(3)]
    outs = [r + 0.05 * torch.randn(r.shape, generator=g) for r in refs]
    norm = find_decoder_layers(tiny_gemma3())[1][0].post_feedforward_layernorm
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        num = sum((norm(o).double() - norm(r).double()).pow(2).sum() for o, r in zip(outs, refs))
        den = sum(norm(r).double().pow(2).sum() for r in refs)
        assert output_error(outs, refs, norm) == pytest.approx((num / den).item(), rel=1e-6)
    # without the norm each token counts by its size; after it, by its relative error
    assert output_error(outs, refs) != pytest.approx(output_error(outs, refs, norm), rel=0.05)


def test_rotated_linears_clip_their_range_after_the_post_norm():
    """Gemma 3 (sandwich norms): each rotated linear's static range is the calibrated one times
    the rotate_clip_grid ratio with the smallest error after the post-norm; the norm-fed groups
    keep theirs. Llama (no post-norm) keeps every calibrated range."""
    tokens = random_tokens(4, 32, seed=5)
    cfg = sq_config(batches=4)
    gemma = tiny_gemma3(seed=2)
    clipped = quantized(gemma, cfg, tokens)
    plain = quantized(gemma, cfg.replace(algorithm=dataclasses.replace(
        cfg.algorithm, rotate_clip_grid=(1.0,))), tokens)
    report = clipped._smoothquant_report
    rotated = {k: r for k, r in report.items() if "rotation" in r}
    assert len(rotated) == 2 * len(find_decoder_layers(gemma)[1])  # o_proj, down_proj
    for r in rotated.values():
        assert r["clip"] in ROTATED_CLIP_GRID
        assert r["clip_errors"][r["clip"]] == min(r["clip_errors"].values())
    assert any(r["clip"] < 1.0 for r in rotated.values())
    assert all(r["clip"] == 1.0 for k, r in report.items() if k not in rotated)
    assert all(r["clip"] == 1.0 for r in plain._smoothquant_report.values())
    prefix = find_decoder_layers(gemma)[0] + ".0."
    layer_c, layer_p = find_decoder_layers(clipped)[1][0], find_decoder_layers(plain)[1][0]
    checked = [k for k in rotated if k.startswith(prefix)  # o_proj: nothing before it differs
               and plain._smoothquant_report[k]["alpha"] == report[k]["alpha"]]
    assert checked
    for key in checked:
        n = key[len(prefix):]
        want = layer_p.get_submodule(n).input_quantizer.amax * report[key]["clip"]
        assert torch.allclose(layer_c.get_submodule(n).input_quantizer.amax, want, rtol=1e-5)
    llama = quantized(tiny_llama(seed=2), cfg, tokens)._smoothquant_report
    assert any("rotation" in r for r in llama.values())
    assert all(r["clip"] == 1.0 for r in llama.values())


def test_rotate_clip_grid_is_checked():
    with pytest.raises(ConfigError, match="rotate_clip_grid"):
        SmoothQuantConfig(rotate_clip_grid=(1.0, 1.2))


def test_planted_outlier_is_tamed():
    model = plant_outliers(tiny_llama(seed=1))
    tokens = random_tokens(4, 32, seed=11)
    ref = logits(model, tokens)
    err_max = rel_err(logits(quantized(model, "w8a8", tokens), tokens), ref)
    err_sq = rel_err(logits(quantized(model, sq_config(), tokens), tokens), ref)
    assert err_sq < 0.2 * err_max, (err_sq, err_max)


def test_gptq_weights_lower_the_error_and_stay_on_their_grid():
    model = plant_outliers(tiny_llama(seed=3))
    calib, test = random_tokens(8, 32, seed=13), random_tokens(4, 32, seed=113)
    ref = logits(model, test)
    plain = quantized(model, sq_config(alpha=0.8), calib)
    gptq = quantized(model, sq_config(alpha=0.8, gptq=True), calib)
    assert rel_err(logits(gptq, test), ref) < rel_err(logits(plain, test), ref)
    moved = 0
    for (_, a), (_, b) in zip(quant_modules(plain), quant_modules(gptq)):
        w = b.weight_2d().detach()
        assert torch.equal(b.weight_quantizer(w), w)  # exactly on the INT8 grid it keeps
        moved += int(not torch.allclose(b.weight_quantizer(w), a.weight_quantizer(
            a.weight_2d().detach())))
    assert moved == len(quant_modules(gptq))


def test_static_ranges_are_calibrated_on_smoothed_activations():
    model = plant_outliers(tiny_llama(seed=2))
    tokens = random_tokens(4, 32, seed=12)
    q = quantized(model, sq_config(alpha=0.5), tokens)
    q_proj = find_decoder_layers(q)[1][0].self_attn.q_proj
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().amax()))
    set_quantizers(q, False)  # layer 0's input does not depend on quantization
    logits(q, tokens)
    handle.remove()
    amax = q_proj.input_quantizer.amax
    assert amax.numel() == 1 and not q_proj.input_quantizer.spec.dynamic
    assert torch.allclose(amax, torch.stack(seen).max().float(), rtol=1e-5)
    with torch.no_grad():
        raw = find_decoder_layers(model)[1][0].input_layernorm(
            model.model.embed_tokens(tokens)).abs().amax().item()
    assert amax.item() < 0.5 * raw  # smoothing shrank the outlier the range must cover


def test_static_and_dynamic_activation_paths():
    model = plant_outliers(tiny_llama(seed=4))
    tokens = random_tokens(4, 32)
    ref = logits(model, tokens)
    static = quantized(model, sq_config(), tokens)
    dynamic = quantized(model, sq_config(dynamic=True), tokens)
    ds = find_decoder_layers(dynamic)[1][0].mlp.down_proj.input_quantizer
    ss = find_decoder_layers(static)[1][0].mlp.down_proj.input_quantizer
    assert ds.spec.dynamic and ds.spec.granularity == "per_token" and ds.amax is None
    assert ss.amax is not None and ss.amax.numel() == 1
    x = torch.randn(2, 5, 128) * torch.linspace(0.1, 5, 5)[None, :, None]

    def pre(q):  # the online rotation (block diagonal) and smoothing multiply, if any
        t = x if q.rotation is None else x @ torch.block_diag(*[q.rotation] * (
            128 // q.rotation.shape[0]))
        return t if q.pre_quant_scale is None else t * q.pre_quant_scale

    t = pre(ds)
    amax = t.abs().amax(-1, keepdim=True)  # per-token reference
    expect = torch.clamp(torch.round(t / (amax / 127)), -128, 127) * (amax / 127)
    assert torch.allclose(ds(x), expect, atol=1e-5)
    t = pre(ss)
    s_expect = torch.clamp(torch.round(t / (ss.amax / 127)), -128, 127) * (ss.amax / 127)
    assert torch.allclose(ss(x), s_expect, atol=1e-5)
    err_max = rel_err(logits(quantized(model, "w8a8", tokens), tokens), ref)
    for q in (static, dynamic):
        assert rel_err(logits(q, tokens), ref) < err_max


def test_refinement_bisects_toward_the_minimum_and_never_loses_the_grid_best():
    from modelopt_lite.algorithms.smoothquant import DEFAULT_GRID, search_alpha

    class Quadratic:  # a stand-in smoother: the search only calls score()
        calls = []

        def score(self, capture, a):
            self.calls.append(a)
            return (a - 0.83) ** 2

    best, errors = search_alpha(Quadratic(), None, DEFAULT_GRID, refine=0)
    assert best == pytest.approx(0.8)
    best, errors = search_alpha(Quadratic(), None, DEFAULT_GRID, refine=2)
    assert best == pytest.approx(0.825) and len(errors) == len(DEFAULT_GRID) + 4
    assert errors[0.8] == min(errors[a] for a in DEFAULT_GRID)  # the grid's own scores kept
    best, _ = search_alpha(Quadratic(), None, (0.0, 1.0), refine=6)  # edges, long bisection
    assert abs(best - 0.83) <= 1 / 2 ** 7


def test_bad_configs_fail_before_work():
    with pytest.raises(ConfigError):
        SmoothQuantConfig(alpha=2.5)
    with pytest.raises(ConfigError):
        SmoothQuantConfig(alpha=-0.1)
    SmoothQuantConfig(alpha_grid=(0.5, 1.0, 1.5))  # past the paper's range is allowed
    with pytest.raises(ConfigError, match="refine"):
        SmoothQuantConfig(refine=-1)
    with pytest.raises(ConfigError):
        SmoothQuantConfig(alpha_grid=())
    model = tiny_llama()
    weight_only = QuantConfig(algorithm=SmoothQuantConfig())
    with pytest.raises(ConfigError, match="input"):
        mtl.quantize(model, weight_only, calib=random_tokens(2, 8), progress=False)
    with pytest.raises(Exception, match="calibration data"):
        mtl.quantize(model, "int8_smoothquant", progress=False)
    assert not quant_modules(model)  # restored to float


def test_preset_round_trips_through_json():
    cfg = mtl.get_preset("int8_smoothquant")
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert cfg.input.granularity == "per_tensor" and not cfg.input.dynamic
    assert cfg.weight.granularity == "per_channel" and cfg.weight.symmetric


def test_linears_outside_the_decoder_layers_do_not_block_the_layer_capture():
    """OPT-350m-style ``project_in``/``project_out`` (word_embed_proj_dim != hidden_size): their
    static input quantizers have no range while the first layer's inputs are captured; they
    pass through then and calibrate on the whole model after the layers."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=256, word_embed_proj_dim=32)).eval()
    ids = random_tokens(2, 16, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    mtl.quantize(model, "int8_smoothquant", calib=random_tokens(4, 32, seed=2), progress=False)
    for proj in (model.model.decoder.project_in, model.model.decoder.project_out):
        assert proj.input_quantizer.amax is not None
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
