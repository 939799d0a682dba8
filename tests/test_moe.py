"""Mixture-of-experts models: fused 3-D experts unfused into per-expert linears, then quantized,
sparsified, saved, deployed and exported like any other linear."""

import dataclasses
import logging

import pytest
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.moe import (LinearExperts, UnsupportedExpertsError, all_experts_calibrate,
                               left_in_float, unfuse_experts)
from modelopt_lite.nn import is_quantized
from test_quantizer_math import reference_fake_quant
from tiny_models import (random_tokens, tiny_gpt_oss, tiny_llama, tiny_mixtral,
                         tiny_moe_from_config, tiny_qwen2_moe)

MOE = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "gpt_oss": tiny_gpt_oss}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _experts(model, layer=0) -> LinearExperts:
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("arch", sorted(MOE))
def test_unfused_model_computes_what_the_fused_one_does(arch):
    fused = MOE[arch]().double()
    fused.set_experts_implementation("eager")   # transformers' own loop, in float64
    ids = random_tokens(2, 24, seed=1)
    ref = _logits(fused, ids)
    model = MOE[arch]().double()
    names = unfuse_experts(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert not any(p.dim() == 3 for p in model.parameters())
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-12, atol=1e-12)
    with all_experts_calibrate(model):   # every expert runs on every token; outputs unchanged
        torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-12, atol=1e-12)
    assert unfuse_experts(model) == []   # idempotent


# gated and ungated experts, shared experts, latent attention, dense first layers, biases,
# post-norms: one tiny model of each family, built from its transformers config
FAMILIES = ["deepseek_v3", "olmoe", "qwen3_moe", "glm4_moe", "phimoe", "granitemoe",
            "nemotron_h", "ernie4_5_moe", "minimax_m2", "hunyuan_v1_moe"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_moe_families_unfuse_exactly_and_quantize_every_expert(model_type):
    ids = random_tokens(2, 12, seed=1)
    ref_model = tiny_moe_from_config(model_type)
    ref_model.set_experts_implementation("eager")
    ref = _logits(ref_model, ids)
    model = tiny_moe_from_config(model_type)
    fused = {n: (m.num_experts if hasattr(m, "num_experts") else m.down_proj.shape[0],
                 2 + bool(m.has_gate)) for n, m in model.named_modules()
             if hasattr(m, "has_gate") and hasattr(m, "down_proj")}
    assert fused, "the fixture should have fused experts"
    cfg = mtl.get_preset("int4_awq")
    cfg = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, gptq=False))
    mtl.quantize(model, cfg, calib=random_tokens(2, 16, seed=2), progress=False)
    names = {n for n, m in model.named_modules() if is_quantized(m)}
    for path, (n_experts, n_proj) in fused.items():
        assert sum(n.startswith(path + ".") for n in names) == n_experts * n_proj
    assert torch.isfinite(_logits(model, ids)).all()
    mtl.unquantize(model)   # every AWQ scale folded or multiplied back: the float model
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=2e-5)


def test_routers_stay_in_float_and_custom_forward_linears_are_skipped_with_the_reason():
    model = tiny_qwen2_moe()   # shared_expert_gate: a plain nn.Linear(hidden, 1) gate
    mtl.quantize(model, "int8_weight_only", progress=False)
    names = {n for n, m in model.named_modules() if is_quantized(m)}
    assert not any("gate" in n and "gate_proj" not in n for n in names)

    class TopKRouter(nn.Linear):   # returns (logits, weights, ids), as PhiMoE's router does
        def forward(self, x):
            logits = super().forward(x)
            w, i = logits.softmax(-1).topk(2, dim=-1)
            return logits, w, i

    net = nn.Sequential(nn.Linear(64, 64))
    net.add_module("picker", TopKRouter(64, 8))
    plans = {r["name"]: r for r in mtl.quantize(
        net, "int8_weight_only", progress=False)._modelopt_lite["layers"]}
    assert "forward of its own" in plans["picker"]["skipped"] and not plans["0"]["skipped"]
    assert len(net[1](torch.randn(3, 64))) == 3   # still the router
    with pytest.raises(mtl.layers.LayerSelectionError, match="0: TopKRouter.*forward of its own"):
        mtl.quantize(nn.Sequential(TopKRouter(64, 8)), mtl.get_preset("int8_weight_only").replace(
            targets=("0",)), progress=False)


def test_float32_unfused_matches_transformers_default_kernel():
    ids = random_tokens(2, 24, seed=3)
    ref = _logits(tiny_mixtral(), ids)   # transformers' default (grouped) experts kernel
    model = tiny_mixtral()
    unfuse_experts(model)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_gpt_oss_transposed_interleaved_layout_is_read_right():
    fused = tiny_gpt_oss()
    f = fused.model.layers[0].mlp.experts
    gate_up, bias = f.gate_up_proj.detach().clone(), f.gate_up_proj_bias.detach().clone()
    down = f.down_proj.detach().clone()
    unfuse_experts(fused)
    e = _experts(fused)[2]
    # [E, in, 2I] with gate in the even and up in the odd output columns
    torch.testing.assert_close(e.gate_proj.weight, gate_up[2][:, 0::2].t(), rtol=0, atol=0)
    torch.testing.assert_close(e.up_proj.weight, gate_up[2][:, 1::2].t(), rtol=0, atol=0)
    torch.testing.assert_close(e.gate_proj.bias, bias[2][0::2], rtol=0, atol=0)
    torch.testing.assert_close(e.up_proj.bias, bias[2][1::2], rtol=0, atol=0)
    torch.testing.assert_close(e.down_proj.weight, down[2].t(), rtol=0, atol=0)


def test_graph_path_matches_the_routed_loop():
    model = tiny_qwen2_moe().double()
    unfuse_experts(model)
    moe = _experts(model)
    x = torch.randn(10, 128, dtype=torch.float64)
    idx = torch.randint(0, moe.num_experts, (10, 2))
    w = torch.rand(10, 2, dtype=torch.float64)
    torch.testing.assert_close(moe._dense(x, idx, w), moe(x, idx, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["int4_awq", "w8a8", "int8_smoothquant", "int4_weight_only"])
def test_quantize_reaches_every_expert_even_unrouted_ones(preset, caplog):
    """One calibration token routes to 2 of 4 experts per layer; every expert still gets
    statistics (all experts calibrate on every token) and every expert linear is quantized."""
    model = tiny_mixtral()
    ids = random_tokens(2, 16, seed=1)
    with caplog.at_level(logging.WARNING):
        mtl.quantize(model, preset, calib=random_tokens(1, 1, seed=2), progress=False)
    assert "not in modelopt_lite.models.ARCHITECTURES" not in caplog.text
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    expert_linears = [n for n in names if ".experts." in n]
    assert len(expert_linears) == 2 * 4 * 3 and len(names) == 2 * 4 + 2 * 4 * 3
    for _, m in model.named_modules():
        if is_quantized(m) and m.input_quantizer.enabled and not m.input_quantizer.spec.dynamic:
            assert m.input_quantizer.amax is not None and torch.isfinite(
                m.input_quantizer.amax).all()
    assert torch.isfinite(_logits(model, ids)).all()
    assert model._modelopt_lite["experts_unfused"] is True


def test_int4_rtn_expert_weights_match_float64_reference_on_the_fused_slices():
    model = tiny_mixtral()
    fused = model.model.layers[1].mlp.experts.gate_up_proj.detach().double().clone()
    down = model.model.layers[1].mlp.experts.down_proj.detach().double().clone()
    mtl.quantize(model, "int4_weight_only", progress=False)
    spec = model.model.layers[1].mlp.experts[3].up_proj.weight_quantizer.spec
    for name, ref_w in (("gate_proj", fused[3, :256]), ("up_proj", fused[3, 256:]),
                        ("down_proj", down[3])):
        lin = getattr(_experts(model, 1)[3], name)
        with torch.no_grad():
            got = lin.weight_quantizer(lin.weight_2d()).double()
        ref = reference_fake_quant(ref_w, 4, spec.symmetric, spec.block_size)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def _expert_error(model, float_model, x, layer=0) -> float:
    q, f = _experts(model, layer), _experts(float_model, layer)
    with torch.no_grad():
        return sum(((q[e](x) - f[e](x)).pow(2).sum() / f[e](x).pow(2).sum()).item()
                   for e in range(q.num_experts)) / q.num_experts


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_awq_and_smoothquant_search_lower_each_experts_error(arch):
    """Per expert, on the same float inputs: AWQ's scales and clips beat plain RTN and
    SmoothQuant's smoothing beats plain W8A8 (the searches act expert by expert)."""
    calib = random_tokens(8, 32, seed=2)
    float_model = MOE[arch]()
    unfuse_experts(float_model)
    seen = {}
    hook = _experts(float_model).register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0]))
    float_model(calib[:4])
    hook.remove()
    err = {}
    for preset in ("int4_weight_only", "int4_awq_asym", "w8a8", "int8_smoothquant"):
        model = MOE[arch]()
        mtl.quantize(model, preset, calib=calib, progress=False)
        err[preset] = _expert_error(model, float_model, seen["x"])
    assert err["int4_awq_asym"] < 0.8 * err["int4_weight_only"], err
    assert err["int8_smoothquant"] < 0.5 * err["w8a8"], err


def test_gate_up_share_a_scale_and_up_down_folds():
    model = tiny_mixtral()
    mtl.quantize(model, "int4_awq", calib=random_tokens(4, 32, seed=2), progress=False)
    e = _experts(model)[1]
    g, u, d = (lin.input_quantizer.pre_quant_scale
               for lin in (e.gate_proj, e.up_proj, e.down_proj))
    assert g is not None and torch.equal(g, u)   # one explicit multiply for the shared input
    assert d is None                              # folded into up_proj's rows


@pytest.mark.parametrize("arch", sorted(MOE))
@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant"])
def test_scales_fold_exactly_the_float_function_survives_unquantize(arch, preset):
    """AWQ/SmoothQuant on the table's MoE rows (attention folds, per-expert groups): with
    the quantizers removed (explicit multiplies folded back) the model is the float one."""
    ids = random_tokens(2, 16, seed=1)
    float_model = MOE[arch]()
    unfuse_experts(float_model)
    ref = _logits(float_model, ids)
    model = MOE[arch]()
    cfg = mtl.get_preset(preset)
    cfg = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, gptq=False))  # float weights
    mtl.quantize(model, cfg, calib=random_tokens(4, 32, seed=2), progress=False)
    mtl.unquantize(model)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=2e-5)


def test_save_load_and_deploy_round_trip(tmp_path):
    model = tiny_gpt_oss()
    ids = random_tokens(2, 16, seed=1)
    mtl.quantize(model, "int4_awq", calib=random_tokens(4, 32, seed=2), progress=False)
    fake = _logits(model, ids)
    mtl.save(model, tmp_path / "q")
    loaded = mtl.load(tiny_gpt_oss(), tmp_path / "q")
    assert isinstance(_experts(loaded), LinearExperts)
    torch.testing.assert_close(_logits(loaded, ids), fake, rtol=0, atol=0)
    mtl.deploy(model)
    from modelopt_lite.nn.int4_linear import Int4Linear

    assert isinstance(_experts(model, 1)[3].down_proj, Int4Linear)
    torch.testing.assert_close(_logits(model, ids), fake, rtol=1e-3, atol=2e-3)
    mtl.save(model, tmp_path / "d")
    again = mtl.load(tiny_gpt_oss(), tmp_path / "d")
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["w8a8", "int4_awq"])
def test_onnx_export_of_a_moe_model_matches_onnxruntime(preset, tmp_path):
    from modelopt_lite.export.onnx import export_onnx
    from modelopt_lite.export.verify import compare_with_torch

    model = tiny_mixtral(layers=1)
    mtl.quantize(model, preset, calib=random_tokens(4, 32, seed=2), progress=False)
    result = export_onnx(model, random_tokens(1, 8, seed=1), tmp_path / "m.onnx")
    assert result.qdq_nodes > 0
    err = compare_with_torch(model, random_tokens(2, 11, seed=5), result.path)  # other shape
    assert err["max_abs"] < 1e-4, err


def test_sparsify_prunes_every_expert():
    model = tiny_mixtral()
    mtl.sparsify(model, method="sparsegpt", calib=random_tokens(4, 32, seed=2), progress=False)
    for e in _experts(model, 1).experts():
        for lin in (e.gate_proj, e.up_proj, e.down_proj):
            groups = (lin.weight.detach() != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
            assert groups.max() <= 2
    assert model._modelopt_lite["experts_unfused"] is True


def test_summary_folds_experts_into_one_line_per_projection():
    model = tiny_qwen2_moe()
    mtl.quantize(model, "int4_weight_only", progress=False)
    text = mtl.format_summary(model)
    assert "model.layers.0.mlp.experts.*.down_proj" in text and "8 experts" in text
    assert "mlp.experts.3.up_proj" not in text
    assert text.splitlines()[-1].startswith(f"{2 * (4 + 8 * 3 + 3)} layer(s) quantized")


def test_expert_parallel_experts_are_refused_before_any_change():
    model = tiny_mixtral()
    model.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(UnsupportedExpertsError, match=r"layers\.1\.mlp\.experts.*expert paral"):
        mtl.quantize(model, "int4_weight_only", progress=False)
    assert not isinstance(_experts(model, 0), LinearExperts)   # nothing unfused


def test_unreadable_expert_layouts_are_reported_as_left_in_float(caplog):
    class OddExperts(nn.Module):   # a layout without the transformers decorator's attributes
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 64, 64))

        def forward(self, x):
            return x + (x @ self.w).mean(0)

    model = tiny_llama()
    model.model.layers[0].mlp.experts = OddExperts()
    assert left_in_float(model) == ["model.layers.0.mlp.experts"]
    with caplog.at_level(logging.WARNING):
        mtl.quantize(model, "int8_weight_only", progress=False)
    assert "stay in float: model.layers.0.mlp.experts" in caplog.text


def test_qat_trains_expert_weights():
    from modelopt_lite.qat import prepare_qat

    model = tiny_mixtral()
    prepare_qat(model, "int4_weight_only", progress=False)
    ids = random_tokens(2, 16, seed=1)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [e.down_proj.weight.grad for e in _experts(model).experts()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_experts_on_the_meta_device_are_refused_with_the_way_out():
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(
            vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    with pytest.raises(UnsupportedExpertsError, match="meta device.*stream_layers"):
        unfuse_experts(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_deployed_moe_runs_on_the_int4_kernels_on_gpu(arch):
    """Expert by expert on the same input (routing cannot flip): the INT4 kernels compute
    what the fake-quant experts do; and the deployed model runs eagerly and compiled."""
    import copy

    from modelopt_lite.nn.int4_linear import int4_layers

    model = MOE[arch]()
    mtl.quantize(model, "int4_awq", calib=random_tokens(4, 32, seed=2), progress=False)
    model = model.cuda().half()
    fake = copy.deepcopy(model)
    mtl.deploy(model)
    assert sum(".experts." in n for n in int4_layers(model)) == 2 * 4 * 3
    x = torch.randn(7, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        for e in range(4):
            want, got = _experts(fake, 1)[e](x).float(), _experts(model, 1)[e](x).float()
            assert ((got - want).norm() / want.norm()).item() < 1e-2
    ids = random_tokens(2, 16, seed=1).cuda()
    eager = _logits(model, ids).float()
    assert torch.isfinite(eager).all()
    with torch.no_grad():   # the static-shape expert path under torch.compile
        compiled = torch.compile(model)(ids).logits.float()
    per_token = (compiled - eager).norm(dim=-1) / eager.norm(dim=-1)
    assert per_token.median().item() < 1e-2


def test_a_failed_quantize_gives_the_model_back_fused():
    model = tiny_mixtral()
    ids = random_tokens(2, 12, seed=1)
    ref = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mtl.nn.CalibrationError):   # AWQ without calibration data
        mtl.quantize(model, "int4_awq", progress=False)
    assert not isinstance(_experts(model), LinearExperts)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(MOE))
def test_fuse_experts_restores_the_original_layout(arch):
    from modelopt_lite.moe import fuse_experts

    model = MOE[arch]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unfuse_experts(model)
    assert fuse_experts(model) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert model.state_dict().keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    quantized = MOE[arch]()
    mtl.quantize(quantized, "int8_weight_only", progress=False)
    with pytest.raises(UnsupportedExpertsError, match="not a float nn.Linear: unquantize"):
        fuse_experts(quantized)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_bf16_experts_round_once_like_transformers_default_kernels(impl):
    """A float32 router's weights with bf16 experts: the sum stays float32 and is rounded
    once, as transformers' own grouped and batched kernels do (bit for bit)."""
    import copy

    model = tiny_moe_from_config("deepseek_v3").to(torch.bfloat16)
    model.set_experts_implementation(impl)
    fused = _experts(model, 1)
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(64)])
    w = torch.rand(64, 2)
    want = fused(x, idx, w)
    unfused = copy.deepcopy(model)
    unfuse_experts(unfused)
    got = _experts(unfused, 1)(x, idx, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_falcon_linear_subclass_still_quantizes_and_structural_routers_stay_float():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4)).eval()
    mtl.quantize(falcon, "int8_weight_only", progress=False)   # FalconLinear: x W^T + b
    assert sum(is_quantized(m) for m in falcon.modules()) == 8

    model = tiny_mixtral()
    unfuse_experts(model)
    model.model.layers[0].mlp.add_module("scorer", nn.Linear(128, 4, bias=False))  # 4 experts
    from modelopt_lite.moe import router_linears

    assert router_linears(model) == {"model.layers.0.mlp.scorer"}
    layers = {r["name"]: r for r in mtl.quantize(
        model, "int8_weight_only", progress=False)._modelopt_lite["layers"]}
    assert layers["model.layers.0.mlp.scorer"]["skipped"] == "MoE router: routing stays in float"


def test_a_failed_load_gives_the_model_back_fused(tmp_path):
    model = tiny_mixtral()
    mtl.quantize(model, "int8_weight_only", progress=False)
    mtl.save(model, tmp_path)
    other = tiny_mixtral(experts=8)   # not the checkpoint's model
    with pytest.raises(mtl.io.CheckpointError):
        mtl.load(other, tmp_path)
    assert not isinstance(_experts(other), LinearExperts)


def test_sparsify_checks_before_unfusing_and_fused_back_keeps_the_zeros(tmp_path):
    from modelopt_lite.moe import fuse_experts

    model = tiny_mixtral()
    with pytest.raises(ValueError, match="needs calibration data"):
        mtl.sparsify(model, method="sparsegpt", progress=False)
    assert not isinstance(_experts(model), LinearExperts)
    ids = random_tokens(2, 12, seed=1)
    mtl.sparsify(model, progress=False)   # magnitude 2:4
    sparse = _logits(model, ids)
    fuse_experts(model)   # back to the Hugging Face layout for save_pretrained
    assert "experts_unfused" not in model._modelopt_lite
    assert not any(".experts." in r["name"] for r in model._modelopt_lite["sparsity"]["layers"])
    torch.testing.assert_close(_logits(model, ids), sparse, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    from transformers import MixtralForCausalLM

    again = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again, ids), sparse, rtol=1e-5, atol=1e-5)
    assert (again.model.layers[0].mlp.experts.down_proj == 0).float().mean().item() >= 0.5


def test_awq_keeps_one_set_of_statistics_for_the_input_all_experts_share():
    """Every expert calibrates on every token, so the experts' gate/up input is one tensor:
    its statistics and GPTQ Hessian are kept once per MoE block, not once per expert
    (256 experts x hidden^2 float64 Hessians would not fit in memory)."""
    from modelopt_lite.algorithms import awq

    seen = []
    real = awq._capture

    def spy(*args, **kwargs):
        cap = real(*args, **kwargs)
        seen.append((dict(cap.hessian), dict(cap.absmean)))   # the layer's run clears them
        return cap

    model = tiny_qwen2_moe()
    awq._capture = spy
    try:
        mtl.quantize(model, "int4_awq", calib=random_tokens(2, 16, seed=2), progress=False)
    finally:
        awq._capture = real
    hessian, absmean = seen[0]
    gate = [k for k in hessian if k.endswith("gate_proj") and ".experts." in k]
    down = [k for k in hessian if k.endswith("down_proj") and ".experts." in k]
    assert len(gate) == len(down) == 8
    assert len({id(hessian[k]) for k in gate}) == 1
    assert len({id(hessian[k]) for k in down}) == 8   # each expert's own product
    assert all(absmean[k] is absmean[gate[0]] for k in gate)


def test_smoothquant_gptq_replays_in_chunks_under_a_hessian_budget(monkeypatch):
    """Under a budget of one Hessian the layer replays once per chunk; every replay sees the
    layer as it came and the rounded weights land after the last, so the model is the one a
    single pass makes, bit for bit. The default budget keeps a dense layer in one replay."""
    from modelopt_lite.algorithms import smoothquant

    mods = {f"l{i}": nn.Linear(256, 8) for i in range(3)}
    for m in mods.values():
        m.in_features_2d = 256
    assert len(smoothquant._hessian_chunks([["l0"], ["l1"], ["l2"]], mods)) == 1
    calib = random_tokens(2, 16, seed=2)
    whole = tiny_mixtral()
    mtl.quantize(whole, "int8_smoothquant", calib=calib, progress=False)
    monkeypatch.setattr(smoothquant, "HESSIAN_BYTES", 8 * 256 * 256)
    assert smoothquant._hessian_chunks([["l0"], ["l1"], ["l2"]], mods) == [
        [["l0"]], [["l1"]], [["l2"]]]
    chunks = []
    real = smoothquant._hessian_chunks
    monkeypatch.setattr(smoothquant, "_hessian_chunks",
                        lambda sets, mods: chunks.append(real(sets, mods)) or chunks[-1])
    chunked = tiny_mixtral()
    mtl.quantize(chunked, "int8_smoothquant", calib=calib, progress=False)
    # replays per decoder layer: six 128-wide sets (qkv, o, 4 experts' gate+up) at a quarter
    # of the budget each make 2 chunks; the 4 experts' 256-wide down_proj one chunk each
    assert [len(c) for c in chunks] == [2 + 4] * 2
    for (n, a), (_, b) in zip(whole.state_dict().items(), chunked.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_sparsegpt_shares_the_experts_input_hessian_and_splits_the_stack(monkeypatch):
    """All experts' gate/up read one tensor while calibrating: one Hessian per MoE block.
    Pruning the shared group in several parts gives the same masks (rows are independent)."""
    from modelopt_lite.sparsity import prune

    made = []
    real = prune.HessianAccumulator

    class Counting(real):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(prune, "HessianAccumulator", Counting)
    calib = random_tokens(2, 16, seed=2)
    whole = tiny_mixtral()
    mtl.sparsify(whole, method="sparsegpt", calib=calib, progress=False)
    # per layer: qkv, o, the experts' shared gate/up input, 4 down_proj inputs
    assert len(made) == 2 * (2 + 1 + 4)
    monkeypatch.setattr(prune, "STACK_BYTES", 4 * 256 * 128)   # one linear per part
    split = tiny_mixtral()
    mtl.sparsify(split, method="sparsegpt", calib=calib, progress=False)
    for e in range(4):
        for name in ("gate_proj", "up_proj", "down_proj"):
            a = getattr(_experts(whole, 1)[e], name)
            b = getattr(_experts(split, 1)[e], name)
            assert torch.equal(a.weight_mask, b.weight_mask)
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_the_linear_probe_judges_each_instance_without_side_effects():
    from modelopt_lite.layers import _custom_forward

    class Adapter(nn.Linear):   # x W^T + b + x A^T B^T
        def __init__(self, *args):
            super().__init__(*args)
            self.a = nn.Parameter(0.01 * torch.randn(4, self.in_features))
            self.b = nn.Parameter(torch.zeros(self.out_features, 4))

        def forward(self, x):
            return super().forward(x) + x @ self.a.t() @ self.b.t()

    class Plain(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x @ self.weight.t() + self.bias)

    fresh, trained = Adapter(64, 32), Adapter(64, 32)
    with torch.no_grad():
        trained.b.normal_(0, 0.01)   # a 1 % change of the output: not a plain linear
    assert _custom_forward(fresh) is None and "forward of its own" in _custom_forward(trained)
    plain = Plain(64, 32).train()
    calls = []
    plain.register_forward_hook(lambda *a: calls.append(1))
    rng = torch.get_rng_state()
    assert _custom_forward(plain) is None   # dropout off while probing
    assert plain.training and plain.drop.training and not calls
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.device("meta"):   # streamed models plan on the meta device
        router, meta_plain = nn.Linear(64, 8), Plain(64, 32)
        router.__class__ = type("Router", (nn.Linear,), {
            "forward": lambda self, x: nn.Linear.forward(self, x).topk(2, -1)})
    assert _custom_forward(router) is not None and _custom_forward(meta_plain) is None
