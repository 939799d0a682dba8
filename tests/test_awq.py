"""AWQ: pure search functions on bare tensors, and the layer walker on tiny models."""

import copy
import logging

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.algorithms import awq_search as S
from modelopt_lite.algorithms.awq import AWQConfig, apply_artefacts, save_artefacts
from modelopt_lite.config import ConfigError, MaxCalibConfig, QuantizerSpec
from modelopt_lite.models import find_decoder_layers
from tiny_models import ALL, random_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine run far faster without thread hand-offs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spec(block=32, symmetric=True):
    return QuantizerSpec(num_bits=4, granularity="per_block", block_size=block, symmetric=symmetric)


def awq_cfg(block=32, symmetric=True, **algo):
    return mtl.get_preset("int4_awq").replace(weight=spec(block, symmetric),
                                               algorithm=AWQConfig(**algo))


def _ref_qdq(w, block, symmetric, ratio=1.0):
    """Independent float64 loop over (row, block)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for b in range(0, w.shape[1], block):
            x = w[r, b:b + block].double()
            if symmetric:
                amax = max(x.max().item(), -x.min().item() * 7 / 8)  # -8 is on the grid
                scale = max(amax * ratio, 1e-8) / 7
                out[r, b:b + block] = torch.clamp(torch.round(x / scale), -8, 7) * scale
            else:
                lo, hi = x.min().item() * ratio, x.max().item() * ratio
                scale = max(hi - lo, 1e-8) / 15
                zero = -lo / scale
                out[r, b:b + block] = (torch.clamp(torch.round(x / scale + zero), 0, 15) - zero) * scale
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_weight_matches_reference(symmetric):
    w = torch.randn(6, 96)
    got = S.qdq_weight(w, spec(32, symmetric)).double()
    assert torch.allclose(got, _ref_qdq(w, 32, symmetric), atol=1e-5)
    amin, amax = S.weight_range(w, spec(32, symmetric))
    shrunk = S.qdq_weight(w, spec(32, symmetric), None if amin is None else amin * 0.8, amax * 0.8)
    assert torch.allclose(shrunk.double(), _ref_qdq(w, 32, symmetric, 0.8), atol=1e-5)
    assert not torch.allclose(shrunk.double(), got)


def _planted(tokens=512, k=128, n=64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 40.0  # activation outliers
    return x, torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_beats_rtn_on_planted_outliers(symmetric):
    x, w = _planted()
    ref = x @ w.t()
    rtn = (x @ S.qdq_weight(w, spec(64, symmetric)).t() - ref).pow(2).mean()
    s = S.search_scale(x, w, spec(64, symmetric))
    awq = (x @ S.scaled_weight(w, s, spec(64, symmetric)).t() - ref).pow(2).mean()
    assert s.shape == (128,) and not torch.allclose(s, torch.ones_like(s))
    assert awq < 0.7 * rtn, (awq, rtn)


def test_candidate_scales_are_normalised_and_include_identity():
    x = torch.rand(40) * 10 + 0.1
    c = S.candidate_scales(x, torch.rand(40) + 0.1, 20)
    assert c.shape == (21, 40) and torch.equal(c[0], torch.ones(40))
    assert torch.allclose(c.amax(1) * c.amin(1), torch.ones(21), atol=1e-4)


def test_clip_search_never_worse_and_matches_brute_force():
    x, w = _planted(tokens=256, k=64, n=8)
    sp = spec(32, True)
    gram = S.block_gram(x, 32)
    ratios = S.clip_ratios(10, 0.5)
    amin, amax = S.search_clip(w, gram, sp, ratios)
    _, full = S.weight_range(w, sp)
    for r in range(w.shape[0]):  # brute force per (row, block) partial output error
        for b in range(2):
            xs = x[:, 32 * b:32 * b + 32]
            errs = [((xs @ (_ref_qdq(w[r:r + 1, 32 * b:32 * b + 32], 32, True,
                                         float(q))[0].float()
                           - w[r, 32 * b:32 * b + 32])).pow(2).sum()) for q in ratios]
            best = ratios[int(torch.stack(errs).argmin())]
            assert torch.isclose(amax[r, b], full[r, b] * best, rtol=1e-4)
    assert (amax <= full + 1e-7).all() and (amax < full).any()


def _err(model, ref, tokens):
    with torch.no_grad():
        return (model(tokens).logits - ref).pow(2).mean().item()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_awq_beats_rtn_and_fold_alone_is_exact(arch):
    model = ALL[arch]()
    calib, test = random_tokens(8, 48, seed=1), random_tokens(4, 48, seed=101)
    with torch.no_grad():
        ref = model(test).logits
    rtn = mtl.quantize(copy.deepcopy(model), awq_cfg().replace(algorithm=MaxCalibConfig()),
                       progress=False)
    awq = mtl.quantize(copy.deepcopy(model), awq_cfg(gptq=False), calib=calib, progress=False)
    gptq = mtl.quantize(copy.deepcopy(model), awq_cfg(), calib=calib, progress=False)
    assert _err(awq, ref, test) < _err(rtn, ref, test)
    assert _err(gptq, ref, test) < _err(rtn, ref, test)
    for m in gptq.modules():  # GPTQ moves weights onto the searched grid, not the grid
        if hasattr(m, "weight_quantizer") and m.weight_quantizer.enabled:
            w = m.weight_2d().detach()
            assert torch.allclose(m.weight_quantizer(w), w, atol=1e-6)
    if arch == "gemma3":  # grouped-query attention (4 query heads, 1 kv head): v -> o on request
        assert not any(k.endswith("::self_attn.o_proj") for k in awq._awq_scales)
        tied = mtl.quantize(copy.deepcopy(model), awq_cfg(gqa_v_o=True), calib=calib,
                            progress=False)
        assert any(k.endswith("::self_attn.o_proj") for k in tied._awq_scales)
        assert _err(tied, ref, test) < _err(rtn, ref, test)
    for m in awq.modules():  # the folded float model equals the original
        if hasattr(m, "weight_quantizer"):
            m.weight_quantizer.enabled = False
    assert torch.allclose(awq(test).logits, ref, atol=1e-4, rtol=1e-4)


def test_awq_ranges_are_set_per_block_and_shrunk():
    model = mtl.quantize(ALL["llama"](), awq_cfg(gptq=False), calib=random_tokens(4, 32),
                         progress=False)  # GPTQ would move the weights after the clip
    q = model.model.layers[0].mlp.down_proj.weight_quantizer
    w = model.model.layers[0].mlp.down_proj.weight
    blocks = w.detach().reshape(w.shape[0], -1, 32)
    full = torch.maximum(blocks.amax(-1), -blocks.amin(-1) * 7 / 8)
    assert q.amax.shape == full.shape and (q.amax <= full + 1e-6).all() and (q.amax < full).any()


def test_sequential_layers_see_quantized_outputs_of_earlier_layers(monkeypatch):
    from modelopt_lite.algorithms import awq

    seen = {}
    original = awq._process_layer

    def spy(model, name, layer, inputs, algo, record):
        seen[name] = inputs.hidden(0).clone()
        original(model, name, layer, inputs, algo, record)

    monkeypatch.setattr(awq, "_process_layer", spy)
    model = ALL["llama"](layers=3)
    calib = random_tokens(3, 24)
    mtl.quantize(model, awq_cfg(), calib=calib, progress=False)
    with torch.no_grad():
        hs = model(calib[:1], output_hidden_states=True).hidden_states
    path, layers = find_decoder_layers(model)
    assert len(seen) == 3
    for i in range(3):
        assert torch.allclose(seen[f"{path}.{i}"], hs[i], atol=1e-5), i


def test_layer_on_other_device_path_matches():
    model = ALL["llama"]()
    calib, test = random_tokens(4, 32, seed=3), random_tokens(2, 32, seed=4)
    a = mtl.quantize(copy.deepcopy(model), awq_cfg(), calib=calib, progress=False)
    b = mtl.quantize(copy.deepcopy(model), awq_cfg(device="cpu"), calib=calib, progress=False)
    with torch.no_grad():
        assert torch.allclose(a(test).logits, b(test).logits, atol=1e-5)


def test_artefacts_and_checkpoint_reuse(tmp_path):
    model = ALL["gemma3"]()
    calib, test = random_tokens(4, 32), random_tokens(2, 32)
    quant = mtl.quantize(copy.deepcopy(model), awq_cfg(block=16), calib=calib, progress=False)
    with torch.no_grad():
        want = quant(test).logits
    save_artefacts(quant, tmp_path / "awq")
    cfg = awq_cfg(block=16, artefacts=str(tmp_path / "awq"))
    again = mtl.quantize(copy.deepcopy(model), cfg, progress=False)  # no calibration data
    with torch.no_grad():
        assert torch.allclose(again(test).logits, want, atol=1e-5)
    mtl.save(quant, tmp_path / "ckpt")
    loaded = mtl.load(copy.deepcopy(model), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(loaded(test).logits, want, atol=1e-5)
    other = ALL["opt"]()
    with pytest.raises(ValueError, match="match no group"):
        apply_artefacts(mtl.quantize(other, awq_cfg(block=16).replace(
            algorithm=MaxCalibConfig()), progress=False), tmp_path / "awq")


def test_unknown_architecture_falls_back_with_warning(caplog):
    model = ALL["llama"]()
    model.config.model_type = "not-a-known-arch"
    with torch.no_grad():  # outlier input channels: the case AWQ's scales exist for
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 30.0
            layer.post_attention_layernorm.weight[:4] *= 30.0
    calib, test = random_tokens(8, 32, seed=5), random_tokens(2, 32, seed=6)
    with torch.no_grad():
        ref = model(test).logits
    rtn = mtl.quantize(copy.deepcopy(model), awq_cfg().replace(algorithm=MaxCalibConfig()),
                       progress=False)
    with caplog.at_level(logging.WARNING):
        awq = mtl.quantize(copy.deepcopy(model), awq_cfg(), calib=calib, progress=False)
    assert "not in modelopt_lite.models.ARCHITECTURES" in caplog.text
    q = awq.model.layers[0].self_attn.q_proj.input_quantizer
    assert q.pre_quant_scale is not None  # explicit multiply, nothing folded
    assert torch.equal(awq.model.layers[0].input_layernorm.weight,
                       model.model.layers[0].input_layernorm.weight)
    assert _err(awq, ref, test) < 0.8 * _err(rtn, ref, test)


def test_indivisible_layers_are_skipped_and_model_stays_exact():
    model = ALL["llama"](hidden=96, inter=128)  # block 64: attention (in 96) skipped
    calib, test = random_tokens(4, 32), random_tokens(2, 32)
    with torch.no_grad():
        ref = model(test).logits
    awq = mtl.quantize(copy.deepcopy(model), awq_cfg(block=64, gptq=False), calib=calib,
                       progress=False)  # (GPTQ moves the weights: the float check below)
    skipped = {r["name"] for r in awq._modelopt_lite["layers"] if r["skipped"]}
    assert "model.layers.0.self_attn.q_proj" in skipped
    assert "model.layers.0.mlp.down_proj" not in skipped
    assert torch.equal(awq.model.layers[0].self_attn.q_proj.weight,
                       model.model.layers[0].self_attn.q_proj.weight)
    for m in awq.modules():
        if hasattr(m, "weight_quantizer"):
            m.weight_quantizer.enabled = False
    assert torch.allclose(awq(test).logits, ref, atol=1e-4, rtol=1e-4)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError, match="at least 20"):
        AWQConfig(n_grid=10)
    for name, sym in (("int4_awq", True), ("int4_awq_asym", False)):
        cfg = mtl.get_preset(name)
        assert cfg.weight.block_size == 128 and cfg.weight.symmetric is sym
        assert cfg.on_indivisible == "skip" and cfg.algorithm.name == "awq"
        assert mtl.QuantConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(Exception, match="calibration data"):
        mtl.quantize(ALL["llama"](), "int4_awq", progress=False)


def test_summary_reports_gptq_weight_error_against_the_float_weight(tmp_path):
    from modelopt_lite.summary import format_summary, summary_rows

    model = ALL["llama"]()
    calib = random_tokens(4, 32)
    awq = mtl.quantize(copy.deepcopy(model), awq_cfg(gptq=False), calib=calib, progress=False)
    gptq = mtl.quantize(copy.deepcopy(model), awq_cfg(), calib=calib, progress=False)
    rows = {r["name"]: r for r in summary_rows(gptq)}
    quantized = [r for r in rows.values() if r["status"] == "quantized"]
    assert quantized and all(r["sqnr_db"] is not None and 5 < r["sqnr_db"] < 60
                             for r in quantized)
    # the first layer's q_proj sees the same inputs in both runs, so GPTQ started from the
    # AWQ-scaled float weight the AWQ-only model holds: float64 SQNR against that weight
    name = next(n for n in rows if n.endswith("layers.0.self_attn.q_proj"))
    float_w = awq.get_submodule(name).weight_2d().double()
    err = gptq.get_submodule(name).weight_2d().double() - float_w
    want = 10 * torch.log10(float_w.pow(2).sum() / err.pow(2).sum()).item()
    assert rows[name]["sqnr_db"] == pytest.approx(want, abs=0.05)
    assert "inf" not in format_summary(gptq)
    mtl.save(gptq, tmp_path / "ckpt")                       # kept in the checkpoint's records
    loaded = mtl.load(copy.deepcopy(model), tmp_path / "ckpt")
    again = {r["name"]: r["sqnr_db"] for r in summary_rows(loaded)}
    assert again[name] == pytest.approx(rows[name]["sqnr_db"])
    mtl.unquantize(gptq)                     # quantized again without GPTQ: no stale record
    rtn = mtl.quantize(gptq, awq_cfg().replace(algorithm=MaxCalibConfig()), progress=False)
    fresh = {r["name"]: r for r in summary_rows(rtn)}[name]
    w = rtn.get_submodule(name).weight_2d().detach()
    noise = (rtn.get_submodule(name).weight_quantizer(w).double() - w.double()).pow(2).sum()
    if noise == 0:   # the GPTQ weight still sits on the new grid: said so, no number
        assert fresh["sqnr_db"] is None and "grid" in fresh["reason"]
    else:
        want = 10 * torch.log10(w.double().pow(2).sum() / noise).item()
        assert fresh["sqnr_db"] == pytest.approx(want, abs=1e-3)
    assert fresh["sqnr_db"] != rows[name]["sqnr_db"]


def test_encoder_decoder_artefacts_cover_both_stacks(tmp_path):
    """T5: scales searched for the encoder's and the decoder's layers are saved and applied
    again without calibration data, to the same logits."""
    from tiny_models import tiny_t5

    calib, ids = random_tokens(4, 16, seed=1), random_tokens(2, 12, seed=2)
    dec = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
    quant = mtl.quantize(tiny_t5(), awq_cfg(block=32), calib=calib, progress=False)
    keys = set(quant._awq_scales)
    assert any(k.startswith("encoder.block.1::") for k in keys)
    assert any(k.startswith("decoder.block.1::layer.1.EncDecAttention") for k in keys)
    with torch.no_grad():
        want = quant(ids, decoder_input_ids=dec).logits
    save_artefacts(quant, tmp_path / "awq")
    again = mtl.quantize(tiny_t5(), awq_cfg(block=32, artefacts=str(tmp_path / "awq")),
                         progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, decoder_input_ids=dec).logits, want,
                                   rtol=0, atol=1e-5)
    mtl.deploy(again)
    with pytest.raises(ValueError, match="deployed Int4Linear"):
        apply_artefacts(again, tmp_path / "awq")
