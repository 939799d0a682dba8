"""QAT: STE/LSQ gradients against hand-derived values, training, freezing, convert, resume."""

import copy
import math

import pytest
import torch
from torch import nn

from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.nn.functional import fake_quant
from modelopt_lite.plugins.loop import fit
from modelopt_lite.plugins.masks import apply_masks_, mask_grads_
from modelopt_lite.qat import (QATConfig, LearnedRangeQuantizer, convert,
                               load_qat_state_dict, mode_of, prepare_qat, qat_state_dict,
                               quantizers)

INT4_BLOCK = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=16),
                         exclude=())
W4A8 = INT4_BLOCK.replace(input=QuantizerSpec(num_bits=8, granularity="per_tensor"))

# int4 symmetric, scale 0.5: codes in [-8, 7]; x/scale = y; unclamped iff -8.5 <= y <= 7.5
X = [-5.0, -4.2, 0.3, 0.1, 3.7, 3.8, 10.0]
Y = [-10.0, -8.4, 0.6, 0.2, 7.4, 7.6, 20.0]
INSIDE = [0, 1, 1, 1, 1, 0, 0]
# LSQ d x_hat / d scale: round(y) - y inside, the clamped code outside
D_SCALE = [-8.0, 0.4, 0.4, -0.2, -0.4, 7.0, 7.0]


def test_ste_passes_gradient_through():
    x = torch.tensor(X, requires_grad=True)
    fake_quant(x, torch.tensor(0.5), None, 4, True).backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == torch.arange(1.0, 8.0).tolist()


def test_clipped_ste_zeroes_gradient_outside_range():
    x = torch.tensor(X, requires_grad=True)
    fake_quant(x, torch.tensor(0.5), None, 4, True, clip_grad=True).sum().backward()
    assert x.grad.tolist() == [float(v) for v in INSIDE]


def test_lsq_scale_gradient_matches_hand_derivation():
    x = torch.tensor(X, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, 1.0, -2.0])
    fake_quant(x, scale, None, 4, True, clip_grad=True).backward(upstream)
    expected = sum(u * d for u, d in zip(upstream.tolist(), D_SCALE))
    assert scale.grad.item() == pytest.approx(expected, abs=1e-5)
    assert x.grad.tolist() == (upstream * torch.tensor(INSIDE, dtype=torch.float)).tolist()


def test_asymmetric_zero_gradient_is_minus_scale_where_clamped():
    # uint4, scale 0.5, zero 4: y = 2x + 4 in [0, 15] inside; x = 6 clamps high, x = -3 low
    x = torch.tensor([-3.0, 0.2, 6.0])
    scale = torch.tensor(0.5, requires_grad=True)
    zero = torch.tensor(4.0, requires_grad=True)
    fake_quant(x, scale, zero, 4, False).sum().backward()
    # d/dzero: 0 inside, -scale clamped; d/dscale: round(y)-y inside, q - zero clamped
    assert zero.grad.item() == pytest.approx(-1.0)
    assert scale.grad.item() == pytest.approx((0 - 4) + (4 - 4.4) + (15 - 4))


def lsq_paper_reference(w, s, g, qn, qp):
    """LSQ as published (Esser et al.): grad_scale, divide, clamp, round_pass, multiply."""
    s = (s - s * g).detach() + s * g
    v = torch.clamp(w / s, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s


def test_learned_block_ranges_match_lsq_paper_away_from_the_rounding_margin():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    model = prepare_qat(nn.Sequential(layer), INT4_BLOCK, qat=QATConfig(lsq=True))
    q = layer.weight_quantizer
    assert isinstance(q, LearnedRangeQuantizer) and mode_of(q) == "learned"
    assert q.lsq_g == pytest.approx(1 / math.sqrt(16 * 7))
    y = torch.empty(8, 4, 16).uniform_(-12, 12)  # codes; some clamp, none in the margins
    y = torch.where((y > 7) & (y < 7.5), y + 1, torch.where((y < -8) & (y > -8.5), y - 1, y))
    with torch.no_grad():
        q.amax.uniform_(0.5, 2.0)
        layer.weight.copy_((y * q.amax.unsqueeze(-1) / 7).reshape(8, 64))
    w = layer.weight.detach().reshape(8, 4, 16)
    upstream = torch.randn(8, 64)
    model[0].quantized_weight().backward(upstream)
    amax = q.amax.detach().clone().requires_grad_(True)
    ref = lsq_paper_reference(w, amax.unsqueeze(-1) / 7, q.lsq_g, -8, 7)
    ref.reshape(8, 64).backward(upstream)
    torch.testing.assert_close(q.amax.grad, amax.grad, rtol=1e-4, atol=1e-6)


def make_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(-1)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def calib_loop(batches):
    def loop(model):
        for xb, _ in batches:
            model(xb)
    return loop


@pytest.mark.parametrize("qat", [QATConfig(), QATConfig(lsq=True), QATConfig(clip_grad=True)],
                         ids=["ste", "lsq", "clipped"])
def test_qat_loss_falls(qat):
    data = make_task()
    model = prepare_qat(tiny(), W4A8, qat=qat, forward_loop=calib_loop(data))
    losses = fit(model, data, torch.optim.Adam(model.parameters(), 1e-2), 48, loss_fn=ce,
                 progress=False)
    assert sum(losses[-8:]) / 8 < 0.4 * sum(losses[:8]) / 8


def test_weight_ranges_follow_weights_by_default_and_fixed_on_request():
    model = prepare_qat(tiny(), INT4_BLOCK)
    assert all(mode_of(q) == "dynamic" for _, q, _ in quantizers(model))
    fixed = prepare_qat(tiny(), INT4_BLOCK, qat=QATConfig(weight_range="fixed"))
    assert all(mode_of(q) == "fixed" for _, q, _ in quantizers(fixed))


def test_freeze_after_fixes_ranges_at_that_step():
    data = make_task()
    model = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True, freeze_after=3),
                        forward_loop=calib_loop(data))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    fit(model, data, opt, 3, loss_fn=ce, progress=False)
    assert {mode_of(q) for _, q, _ in quantizers(model)} == {"learned_frozen"}
    before = {n: q.amax.clone() for n, q, _ in quantizers(model)}
    fit(model, data, opt, 3, loss_fn=ce, progress=False)  # record step is 3 already: no-op
    fit(model, data[:2], opt, 2, loss_fn=ce, progress=False)
    assert all(torch.equal(q.amax, before[n]) for n, q, _ in quantizers(model))
    dyn = prepare_qat(tiny(), INT4_BLOCK, qat=QATConfig(freeze_after=2))
    fit(dyn, data, torch.optim.Adam(dyn.parameters(), 1e-2), 2, loss_fn=ce, progress=False)
    layer = dyn[0]
    blocks = layer.weight.detach().reshape(64, 2, 16)
    torch.testing.assert_close(layer.weight_quantizer.amax,  # int4: -8 is on the grid
                               torch.maximum(blocks.amax(-1), -blocks.amin(-1) * 7 / 8))


def test_convert_gives_plain_buffers_and_identical_outputs():
    data = make_task()
    model = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True), forward_loop=calib_loop(data))
    fit(model, data, torch.optim.Adam(model.parameters(), 1e-2), 5, loss_fn=ce, progress=False)
    x = data[0][0]
    before = model(x)
    convert(model)
    assert not any("amax" in n for n, _ in model.named_parameters())
    assert all(type(q).__name__ == "TensorQuantizer" for _, q, _ in quantizers(model))
    assert torch.equal(before, model(x))
    assert {mode_of(q) for _, q, _ in quantizers(model)} == {"fixed"}


def test_prepare_on_already_quantized_model_keeps_its_ranges():
    import modelopt_lite as mtl
    model = mtl.quantize(tiny(), INT4_BLOCK, progress=False)
    amax = model[0].weight_quantizer.amax.clone()
    prepare_qat(model, qat=QATConfig(weight_range="fixed"))
    assert torch.equal(model[0].weight_quantizer.amax, amax)
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(model, INT4_BLOCK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qat_under_autocast(dtype):
    data = make_task()
    model = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True), forward_loop=calib_loop(data))
    losses = fit(model, data, torch.optim.Adam(model.parameters(), 1e-2), 40, loss_fn=ce,
                 autocast_dtype=dtype, progress=False)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(q.amax.dtype == torch.float32 for _, q, _ in quantizers(model))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_qat_under_torch_compile(backend):
    data = make_task()
    ref = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True), forward_loop=calib_loop(data))
    model = copy.deepcopy(ref)
    compiled = torch.compile(model, backend=backend)
    xb, yb = data[0]
    ce(ref, (xb, yb)).backward()
    ce(compiled, (xb, yb)).backward()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_round_trip_restores_modes_and_ranges():
    data = make_task()
    model = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True, freeze_after=2),
                        forward_loop=calib_loop(data))
    fit(model, data, torch.optim.Adam(model.parameters(), 1e-2), 2, loss_fn=ce, progress=False)
    tensors, meta = qat_state_dict(model)
    fresh = prepare_qat(copy.deepcopy(tiny()), W4A8, qat=QATConfig(lsq=True, freeze_after=2),
                        forward_loop=calib_loop(data))
    load_qat_state_dict(fresh, tensors, meta)
    assert meta["modes"] == qat_state_dict(fresh)[1]["modes"]
    assert fresh._modelopt_lite["qat"]["step"] == 2 and fresh._modelopt_lite["qat"]["frozen"]
    for (n, q, _), (_, q2, _) in zip(quantizers(model), quantizers(fresh)):
        assert torch.equal(q.amax, q2.amax), n


def test_plain_loop_resume_equals_uninterrupted_run(tmp_path):
    data = make_task()

    def run(steps, ckpt=None):
        model = prepare_qat(tiny(), W4A8, qat=QATConfig(lsq=True, freeze_after=5),
                            forward_loop=calib_loop(data))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        fit(model, data, opt, steps, loss_fn=ce, checkpoint_dir=ckpt, save_every=4,
            progress=False)
        return model

    full = run(8)
    run(4, tmp_path)  # interrupted after 4 steps (a checkpoint at step 4)
    resumed = run(8, tmp_path)  # resumes at 4, crosses the freeze at 5
    assert resumed._modelopt_lite["qat"]["step"] == 8
    for (n, t), (_, t_ref) in zip(resumed.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6, msg=n)
    assert [mode_of(q) for _, q, _ in quantizers(resumed)] == ["learned_frozen"] * 4


def sparse_tiny():
    model = tiny()
    for layer in (model[0], model[2]):
        w = layer.weight.detach()
        keep = w.abs().reshape(-1, 4).topk(2, dim=-1).indices
        mask = torch.zeros_like(w).reshape(-1, 4).scatter_(-1, keep, 1.0).reshape(w.shape)
        layer.register_buffer("weight_mask", mask)
        layer.weight.data.mul_(mask)
    return model


def test_masks_stay_fixed_during_qat():
    data = make_task()
    model = prepare_qat(sparse_tiny(), INT4_BLOCK)
    fit(model, data, torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=0.1), 20,
        loss_fn=ce, progress=False)
    for layer in (model[0], model[2]):
        assert torch.all(layer.weight[layer.weight_mask == 0] == 0)
        assert (layer.weight[layer.weight_mask == 1] != 0).float().mean() > 0.99
        assert layer.weight_mask.reshape(-1, 4).sum(-1).eq(2).all()


def test_apply_masks_and_mask_grads():
    model = sparse_tiny()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    assert mask_grads_(model) == 2
    assert torch.equal(model[0].weight.grad, model[0].weight_mask)
    assert apply_masks_(model) == 2
    assert torch.all(model[0].weight[model[0].weight_mask == 0] == 0)
    model[0].weight_mask = torch.ones(3, 3)
    with pytest.raises(ValueError, match="weight_mask shape"):
        apply_masks_(model)


W8A8 = QuantConfig(weight=QuantizerSpec(num_bits=8), exclude=(),
                  input=QuantizerSpec(num_bits=8, granularity="per_tensor"))


@pytest.mark.parametrize("cfg", [W8A8, INT4_BLOCK], ids=["w8a8", "int4_block"])
def test_export_after_qat_matches_ptq_patterns(tmp_path, cfg):
    pytest.importorskip("onnx")
    export = pytest.importorskip("modelopt_lite.export.onnx")
    import onnx

    import modelopt_lite as mtl
    data = make_task()
    x = data[0][0]

    def pattern(model, name):
        path = tmp_path / name
        export.export_onnx(model.eval(), (x,), str(path))
        graph = onnx.load(str(path)).graph
        return ([n.op_type for n in graph.node], sorted(t.data_type for t in graph.initializer))

    ptq = mtl.quantize(tiny(), cfg, forward_loop=calib_loop(data), progress=False)
    qat = prepare_qat(tiny(), cfg, qat=QATConfig(lsq=True), forward_loop=calib_loop(data))
    fit(qat, data, torch.optim.Adam(qat.parameters(), 1e-2), 5, loss_fn=ce, progress=False)
    ops, dtypes = pattern(convert(qat), "qat.onnx")
    assert "DequantizeLinear" in ops
    assert (ops, dtypes) == pattern(ptq, "ptq.onnx")
