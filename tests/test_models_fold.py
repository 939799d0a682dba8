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


SEQ2SEQ_ROWS = ["t5", "mt5", "umt5", "whisper", "mbart", "pegasus", "m2m_100", "blenderbot"]


def _seq2seq(arch):
    from tiny_models import tiny_seq2seq, tiny_t5

    return tiny_t5() if arch == "t5" else tiny_seq2seq(arch)


def _seq2seq_inputs(model, seed=3):
    from modelopt_lite.calib.runner import decoder_inputs

    ids = random_tokens(n=2, seq=12, seed=seed)
    if model.config.model_type == "whisper":   # 16 mel bins x 64 frames
        g = torch.Generator().manual_seed(seed)
        return {"input_features": torch.randn(2, 16, 64, generator=g).to(model.dtype),
                "decoder_input_ids": ids}
    return {"input_ids": ids, **decoder_inputs(model, ids)}


@pytest.mark.parametrize("arch", SEQ2SEQ_ROWS)
def test_seq2seq_rows_fold_exactly_in_both_stacks(arch):
    """The T5-family and pre-norm BART-family rows: every fold (a norm or a linear producer,
    through ReLU in T5 v1.0 and M2M-100) in the encoder's and the decoder's layers leaves the
    float model unchanged; the explicit multiplies are the linears fed from outside the layer
    or through another activation, and no linear is in two groups."""
    from modelopt_lite.models import get_arch, layer_stacks

    model = _seq2seq(arch).double()
    assert get_arch(model) is not None
    inputs = _seq2seq_inputs(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    stacks = layer_stacks(model)
    assert len(stacks) == 2
    for side, (_, layers) in zip(("encoder", "decoder"), stacks):
        for layer in layers:
            groups = layer_groups(model, layer, kv_tied=True)
            names = [n for g in groups for n in g.linears]
            assert len(names) == len(set(names))
            explicit = {n for g in groups if g.prev is None for n in g.linears}
            gated = any(n.endswith("wi_1") for n in names)
            relu = "relu" in (getattr(model.config, "dense_act_fn", None),
                              getattr(model.config, "activation_function", None))
            expected = (set() if gated or relu   # folds into wi_1, or through ReLU
                        else {n for n in names if n.endswith(("fc2", ".wo"))})
            if side == "decoder":   # cross-attention key / value
                expected |= {n for n in names if n.endswith(
                    ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k",
                     "EncDecAttention.v"))}
            assert explicit == expected
            linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            assert set(names) == linears   # every linear of the layer is in a group
            for g in groups:
                if g.prev is None:
                    continue
                width = layer.get_submodule(g.linears[0]).weight.shape[1]
                apply_group_scale_(layer, g, torch.rand(width, dtype=torch.float64) * 4 + 0.25)
    with torch.no_grad():
        out = model(**inputs).logits
    assert (out - ref).abs().max() / ref.abs().max() < 1e-10


@pytest.mark.parametrize("arch", ["mt5", "whisper"])
@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_seq2seq_rows_quantize_with_folds(arch, preset, caplog):
    """quantize() takes the row (no fallback warning), folds scales into the norms and keeps
    an explicit multiply only where the row says; Whisper calibrates through a forward loop."""
    import modelopt_lite as mtl
    from modelopt_lite.config import get_preset

    model = _seq2seq(arch)
    batches = [_seq2seq_inputs(model, seed=s) for s in range(4)]
    with torch.no_grad():
        ref = model(**batches[0]).logits
    cfg = get_preset(preset, block_size=32) if "int4" in preset else preset
    mtl.quantize(model, cfg, forward_loop=lambda m: [m(**b) for b in batches], progress=False)
    assert "not in modelopt_lite.models.ARCHITECTURES" not in caplog.text
    with torch.no_grad():
        out = model(**batches[0]).logits
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < 0.2
    multiplied = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                  if getattr(getattr(m, "input_quantizer", None), "pre_quant_scale", None)
                  is not None}
    assert multiplied <= {"k", "v", "k_proj", "v_proj", "fc2", "wo", "o", "out_proj"}
    assert not multiplied & {"q", "q_proj", "wi_0", "wi_1", "fc1"}   # folded into the norms


def test_smooth_unfoldable_off_keeps_the_rows_explicit_groups_unsmoothed():
    """SmoothQuant with ``smooth_unfoldable=False``: the row's folds still apply, its explicit
    multiplies (cross-attention key / value) are not made."""
    import dataclasses

    import modelopt_lite as mtl
    from modelopt_lite.config import get_preset

    model = _seq2seq("whisper")
    batches = [_seq2seq_inputs(model, seed=s) for s in range(2)]
    cfg = get_preset("int8_smoothquant")
    cfg = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, smooth_unfoldable=False))
    norm = model.model.decoder.layers[0].self_attn_layer_norm.weight.clone()
    mtl.quantize(model, cfg, forward_loop=lambda m: [m(**b) for b in batches], progress=False)
    assert not torch.equal(model.model.decoder.layers[0].self_attn_layer_norm.weight, norm)
    cross = model.model.decoder.layers[0].encoder_attn
    assert cross.k_proj.input_quantizer.pre_quant_scale is None
    assert cross.v_proj.input_quantizer.pre_quant_scale is None


def test_a_fold_through_an_activation_needs_relu():
    """OPT's fc1 -> act -> fc2 folds through ReLU only: with GELU the group is not offered
    (fc1's rows / s would not give fc2 the input x / s)."""
    from tiny_models import tiny_opt

    model = tiny_opt()
    _, layers = find_decoder_layers(model)
    assert any(g.prev == "fc1" for g in layer_groups(model, layers[0]))
    layers[0].activation_fn = torch.nn.GELU()
    assert not any(g.prev == "fc1" for g in layer_groups(model, layers[0]))


def test_post_norm_opt_falls_back_to_per_linear_scales(caplog):
    """OPT-350m normalises after the residual add (``do_layer_norm_before=False``): its norms
    feed the next block, not the layer's linears, so the OPT row's folds would change the
    model. It takes per-linear scales instead."""
    from transformers import OPTConfig, OPTForCausalLM

    from modelopt_lite.models import ARCHITECTURES, get_arch

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
        do_layer_norm_before=False)).eval().double()
    assert get_arch(model) is None
    _, layers = find_decoder_layers(model)
    assert all(g.prev is None and len(g.linears) == 1 for g in layer_groups(model, layers[0]))
    assert "not in modelopt_lite.models.ARCHITECTURES" in caplog.text
    tokens = random_tokens()
    ref = _logits(model, tokens)
    group = ARCHITECTURES["opt"].groups[0]   # what the row would fold: the norm into q, k, v
    apply_group_scale_(layers[0], group, torch.rand(64, dtype=torch.float64) * 4 + 0.25)
    assert (_logits(model, tokens) - ref).abs().max() / ref.abs().max() > 1e-3
