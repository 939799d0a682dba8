"""The architecture table and exact folding: the float model is unchanged by a fold alone."""

import pytest
import torch

from modelopt_lite.calib.sequential import run_sequential
from modelopt_lite.models import (apply_group_scale_, find_decoder_layers, kv_repeat, layer_groups,
                                  tie_scale)
from tiny_models import ALL, random_tokens, tiny_llama


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.double()


@pytest.mark.parametrize("arch", sorted(ALL))
def test_fold_leaves_float_model_unchanged(arch):
    model = ALL[arch]().double()
    tokens = random_tokens()
    ref = _logits(model, tokens)
    _, layers = find_decoder_layers(model)
    n_groups = 0
    for layer in layers:
        for group in layer_groups(model, layer, kv_tied=True):
            width = layer.get_submodule(group.linears[0]).weight.shape[
                0 if arch == "gpt2" else 1]
            s = tie_scale(layer, group, torch.rand(width, dtype=torch.float64) * 4 + 0.25)
            apply_group_scale_(layer, group, s)
            n_groups += 1
    assert n_groups >= 2 * len(layers)
    out = _logits(model, tokens)
    # Gemma norms compute in float32 even in a float64 model: 1e-6, not 1e-12
    assert (out - ref).abs().max() / ref.abs().max() < 1e-6
    assert not torch.allclose(out, ref + 1)  # sanity: the comparison can fail


def test_gqa_value_to_output_scale_is_tied_over_repeated_heads():
    model = tiny_llama(heads=4, kv_heads=2).double()  # head_dim 16: v_proj 32 -> o_proj 64
    tokens = random_tokens()
    ref = _logits(model, tokens)
    layer = find_decoder_layers(model)[1][0]
    assert not any(g.prev == "self_attn.v_proj" for g in layer_groups(model, layer))
    group = next(g for g in layer_groups(model, layer, kv_tied=True)
                 if g.prev == "self_attn.v_proj")
    assert kv_repeat(layer, group) == (2, 16)
    raw = torch.rand(64, dtype=torch.float64) + 0.5
    with pytest.raises(ValueError, match="repeated key/value head"):
        apply_group_scale_(layer, group, raw)
    s = tie_scale(layer, group, raw)
    # o_proj channel h * 16 + d reads v_proj channel (h // 2) * 16 + d
    assert torch.equal(s[:16], s[16:32]) and torch.equal(s[32:48], s[48:])
    torch.testing.assert_close(s[:16], (raw[:16] * raw[16:32]).sqrt())
    apply_group_scale_(layer, group, s)
    out = _logits(model, tokens)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-12


def test_unknown_arch_falls_back_to_explicit_multiply(caplog):
    import modelopt_lite as mtl

    model = ALL["llama"]()
    model.config.model_type = "not-a-known-arch"
    tokens = random_tokens()
    ref = _logits(model, tokens)
    mtl.quantize(model, mtl.QuantConfig(weight=None, input=mtl.QuantizerSpec(
        granularity="per_token", dynamic=True)), progress=False)
    for m in model.modules():
        if hasattr(m, "input_quantizer"):
            m.input_quantizer.enabled = False
    _, layers = find_decoder_layers(model)
    groups = layer_groups(model, layers[0])
    assert "not in modelopt_lite.models.ARCHITECTURES" in caplog.text
    assert all(g.prev is None and len(g.linears) == 1 for g in groups)
    for g in groups:
        lin = layers[0].get_submodule(g.linears[0])
        apply_group_scale_(layers[0], g, torch.rand(lin.weight.shape[1]) + 0.5)
    assert any(layers[0].get_submodule(g.linears[0]).input_quantizer.pre_quant_scale is not None
               for g in groups)
    assert torch.allclose(_logits(model, tokens), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_sequential_runner_reproduces_full_forward(arch):
    model = ALL[arch]().double()
    tokens = random_tokens(n=3, seq=16)
    seen = []
    hidden_in = []

    def process(i, name, layer, inputs):
        seen.append(name)
        hidden_in.append(inputs.hidden(0).clone())

    def loop(m):
        for row in tokens:
            m(row[None])

    run_sequential(model, loop, process, progress=False)
    _, layers = find_decoder_layers(model)
    assert len(seen) == len(layers)
    with torch.no_grad():
        hs = model(tokens[:1], output_hidden_states=True).hidden_states
    for i in range(len(layers)):
        assert torch.allclose(hidden_in[i], hs[i], atol=1e-9), f"layer {i} input differs"
