"""2:4 sparsity: mask math, SparseGPT vs magnitude, mask keeping, quantization, save/load, errors."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.calib.runner import make_forward_loop
from modelopt_lite.nn.quant_modules import is_quantized
from modelopt_lite.plugins.masks import apply_masks_, mask_grads_
from modelopt_lite.sparsity import (HessianAccumulator, SparsityPatternError, is_nm_sparse,
                                    nm_mask, sparse_modules, sparsegpt_prune)
from modelopt_lite.sparsity import prune as prune_mod
from tiny_models import random_tokens, tiny_gpt2, tiny_llama


INT4_ASYM_32 = mtl.QuantConfig(weight=mtl.QuantizerSpec(num_bits=4, granularity="per_block",
                                                       block_size=32, symmetric=False))


def reference_nm_mask(scores, n, m):
    """Independent reference: sort each group in Python."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            vals = [(abs(float(scores[r, g + j])), -j) for j in range(m)]
            for _, negj in sorted(vals, reverse=True)[:n]:
                out[r, g - negj] = True
    return out


def correlated_inputs(tokens, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g) * (0.2 + 3 * torch.rand(dim, generator=g))
    return x + 0.7 * torch.randn(tokens, 1, generator=g)


def output_error(x, w, w_hat):
    return ((x @ (w_hat - w).T).norm() / (x @ w.T).norm()).item()


# --- pure functions ---

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_matches_reference(n, m):
    scores = torch.randn(7, 4 * m)
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, reference_nm_mask(scores, n, m))
    assert (mask.reshape(7, -1, m).sum(-1) == n).all()


def test_nm_mask_rejects_indivisible_dim():
    with pytest.raises(SparsityPatternError, match="not a multiple of 4"):
        nm_mask(torch.randn(3, 6))


def test_sparsegpt_beats_magnitude_on_reconstruction():
    x, w = correlated_inputs(2048, 256), torch.randn(96, 256)
    w_sg, mask = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], 2, 4, block_size=64)
    assert is_nm_sparse(w_sg) and torch.equal(w_sg != 0, mask & (w_sg != 0))
    assert (mask.reshape(96, -1, 4).sum(-1) == 2).all()
    err_sg, err_mag = output_error(x, w, w_sg), output_error(x, w, w * nm_mask(w))
    assert err_sg < 0.85 * err_mag, (err_sg, err_mag)


def reference_sparsegpt(w, h, n, m, percdamp):
    """Independent float64 reference: the OBS loop one column at a time over the whole matrix
    (no blocks, no lazy updates), with the inverse Hessian re-derived per step by
    eliminating the processed column (Frantar & Alistarh 2023, eq. 3/4)."""
    w, h = w.double().clone(), h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    mask = torch.zeros_like(w, dtype=torch.bool)
    hinv = torch.linalg.inv(h)
    for i in range(w.shape[1]):
        if i % m == 0:
            # the group's mask, on the current weights: saliency w_j^2 / [H^-1]_jj^2 with
            # [H^-1]_jj taken once the group's earlier columns are eliminated (the diagonal of
            # the Cholesky factor of H^-1, as in the paper's implementation)
            sub, d = hinv.clone(), []
            for j in range(i, i + m):
                d.append(sub[j, j].sqrt())
                sub = sub - torch.outer(sub[:, j], sub[j]) / sub[j, j]
            keep = torch.topk(w[:, i:i + m] ** 2 / torch.stack(d) ** 2, n, dim=1).indices
            mask[:, i:i + m].scatter_(1, keep, True)
        pruned = ~mask[:, i]
        # remove weight i of the pruned rows, compensating on the remaining columns
        delta = -(w[:, i] / hinv[i, i]).unsqueeze(1) * hinv[i].unsqueeze(0)
        w[pruned] += delta[pruned]
        w[pruned, i] = 0.0
        # column i is settled: drop it from the inverse Hessian of the remaining columns
        hinv = hinv - torch.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return w * mask, mask


@pytest.mark.parametrize("block_size", [8, 64, 128])
def test_sparsegpt_matches_column_by_column_reference(block_size):
    x, w = correlated_inputs(1024, 64, seed=3), torch.randn(24, 64)
    h = 2 * x.T @ x / x.shape[0]
    w_sg, mask = sparsegpt_prune(w, h, 2, 4, block_size=block_size, percdamp=0.01)
    w_ref, mask_ref = reference_sparsegpt(w, h, 2, 4, 0.01)
    assert torch.equal(mask, mask_ref)
    torch.testing.assert_close(w_sg.double(), w_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [1, 3, 4])
def test_hessian_accumulator_matches_float64_gram(split):
    xs = [correlated_inputs(n, 10, seed=n) for n in (7, 33, 5)]
    acc = HessianAccumulator(10, split=split)
    for x in xs:
        acc.add(x)
    x = torch.cat(xs).double()
    torch.testing.assert_close(acc.hessian().double(), 2 * x.T @ x / x.shape[0], rtol=1e-5,
                               atol=1e-5)


def test_sparsegpt_with_identity_hessian_is_magnitude():
    w = torch.randn(16, 32)
    w_sg, mask = sparsegpt_prune(w, torch.eye(32), 2, 4, percdamp=0.0)
    assert torch.equal(mask, nm_mask(w))
    torch.testing.assert_close(w_sg, w * mask)


def test_wanda_mask_uses_input_norms():
    model = nn.Sequential(nn.Linear(16, 8))
    dense = model[0].weight.detach().clone()
    x = torch.randn(64, 16) * torch.linspace(0.1, 5, 16)
    mtl.sparsify(model, method="wanda", forward_loop=lambda mod: mod(x), progress=False)
    expected = reference_nm_mask(dense.abs() * x.pow(2).sum(0).sqrt(), 2, 4)
    assert torch.equal(model[0].weight_mask, expected)
    assert not torch.equal(expected, reference_nm_mask(dense, 2, 4))


# --- the module walker ---

def test_sparsify_exact_pattern_in_every_group_and_defaults_excluded():
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    mtl.sparsify(model, "2:4", method="magnitude", progress=False)
    names = [n for n, _ in sparse_modules(model)]
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    for _, mod in sparse_modules(model):
        assert mod.weight_mask.dtype == torch.bool and mod.weight_mask.shape == mod.weight.shape
        groups = mod.weight_mask.reshape(mod.weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()
        assert (mod.weight[~mod.weight_mask] == 0).all()
    assert torch.equal(model.lm_head.weight, head)


def test_sparsegpt_sequential_keeps_one_layer_of_hessians():
    model, toks = tiny_llama(layers=3), random_tokens(4, 32)
    live, peak = weakref.WeakSet(), [0]

    class Counting(HessianAccumulator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            live.add(self)
            peak[0] = max(peak[0], len(live))

    orig = prune_mod.HessianAccumulator
    prune_mod.HessianAccumulator = Counting
    try:
        mtl.sparsify(model, method="sparsegpt", forward_loop=make_forward_loop(toks, progress=False),
                     progress=False)
    finally:
        prune_mod.HessianAccumulator = orig
    assert 1 <= peak[0] <= 4  # q/k/v share one, o, gate/up share one, down
    assert all(is_nm_sparse(m.weight) for _, m in sparse_modules(model))


def test_hessian_replay_stops_after_last_input_with_identical_statistics():
    from modelopt_lite.calib.sequential import capture_first_layer_inputs

    model, toks = tiny_llama(layers=1), random_tokens(4, 16)
    layer = model.model.layers[0]
    inputs = capture_first_layer_inputs(model, model.model.layers,
                                        make_forward_loop(toks, progress=False))
    plans = prune_mod.plan_sparsity(model, prune_mod.SparsityConfig(method="sparsegpt"))
    plans = [p for p in plans if p.name.startswith("model.layers.0.")]
    down_calls = []
    hook = layer.mlp.down_proj.register_forward_hook(lambda *a: down_calls.append(1))
    hessians = {}
    try:
        for mode in ("full", "early"):
            collector = prune_mod._InputCollector(plans)
            if mode == "full":
                inputs.run(layer)
            else:
                down_calls.clear()
                inputs.feed(layer, after_batch=collector.end_batch)
            collector.remove()
            hessians[mode] = {k: a.hessian() for k, a in collector.accs.items()}
    finally:
        hook.remove()
    assert len(down_calls) == 1  # only the first of 4 batches ran down_proj itself
    assert hessians["full"].keys() == hessians["early"].keys() and len(hessians["full"]) == 4
    for k, h in hessians["full"].items():
        torch.testing.assert_close(hessians["early"][k], h, rtol=0, atol=0)


def test_sparsegpt_beats_magnitude_on_tiny_model_output():
    toks = random_tokens(8, 48)
    ref = tiny_llama()(toks).logits
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = tiny_llama()
        mtl.sparsify(model, method=method, forward_loop=make_forward_loop(toks, progress=False),
                     progress=False)
        errs[method] = ((model(toks).logits - ref).norm() / ref.norm()).item()
    assert errs["sparsegpt"] < errs["magnitude"], errs


@pytest.mark.parametrize("conv", [nn.Conv1d(8, 4, 3), nn.Conv2d(8, 4, 3),
                                  nn.Conv3d(8, 4, (2, 3, 3))], ids=["1d", "2d", "3d"])
def test_convs_group_along_input_channels(conv):
    """Torch convs: at every (output channel, kernel position), each run of 4 consecutive
    input channels keeps its 2 largest weights (the layout sparse tensor cores read)."""
    net = nn.Sequential(conv)
    before = conv.weight.detach().clone()
    mtl.sparsify(net, progress=False)
    w = net[0].weight.detach()   # [out, in, *kernel]
    groups = before.abs().unflatten(1, (2, 4))   # in = 2 groups of 4 channels
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        2, groups.topk(2, dim=2).indices, True).flatten(1, 2)
    assert torch.equal(w != 0, keep)
    assert torch.equal(w[keep], before[keep]) and net[0].weight_mask.shape == w.shape


def test_parametrized_weight_is_skipped_with_the_reason():
    """A weight_norm'd layer's weight is recomputed from its parametrization on every read:
    a mask written into it would be lost, the record would claim a sparsity the weights do
    not have. It is skipped, named, and its neighbours are pruned."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(),
                        weight_norm(nn.Conv1d(16, 8, 3, padding=1)))
    dense = net[2].weight.detach().clone()
    mtl.sparsify(net, progress=False)
    rec = {r["name"]: r for r in net._modelopt_lite["sparsity"]["layers"]}
    assert "parametrization" in rec["2"]["skipped"] and not hasattr(net[2], "weight_mask")
    assert torch.equal(net[2].weight.detach(), dense)
    assert (net[0].weight == 0).float().mean().item() == 0.5


def test_hf_conv1d_groups_along_input_features():
    gpt2 = tiny_gpt2()
    mtl.sparsify(gpt2, method="sparsegpt", forward_loop=make_forward_loop(random_tokens(2, 16),
                 progress=False), progress=False)
    c_fc = gpt2.transformer.h[0].mlp.c_fc  # Conv1D weight is [in, out]
    assert is_nm_sparse(c_fc.weight.t()) and c_fc.weight_mask.shape == c_fc.weight.shape


def test_indivisible_layer_is_skipped_or_explained():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    mtl.sparsify(model, progress=False)
    rec = {r["name"]: r for r in model._modelopt_lite["sparsity"]["layers"]}
    assert "not a multiple of 4" in rec["2"]["skipped"] and not hasattr(model[2], "weight_mask")
    with pytest.raises(SparsityPatternError, match=r"^2: input dim 6 .*multiple of 4.*exclude"):
        mtl.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4)),
                     targets=["2"], progress=False)
    with pytest.raises(SparsityPatternError, match="on_indivisible"):
        mtl.sparsify(nn.Sequential(nn.Linear(6, 4)), on_indivisible="error", progress=False)


def test_calibrated_method_needs_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        mtl.sparsify(tiny_llama(), method="sparsegpt", progress=False)


# --- masks kept through training and quantization ---

def test_masks_unchanged_after_optimizer_steps():
    model, toks = tiny_llama(), random_tokens(4, 32)
    mtl.sparsify(model, progress=False)
    before = {n: m.weight_mask.clone() for n, m in sparse_modules(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    changed = False
    for _ in range(3):
        loss = model(toks, labels=toks).loss
        loss.backward()
        mask_grads_(model)
        w_old = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        apply_masks_(model)
        changed |= not torch.equal(w_old, model.model.layers[0].mlp.up_proj.weight)
    assert changed
    for n, m in sparse_modules(model):
        assert torch.equal(m.weight_mask, before[n])
        assert (m.weight[~m.weight_mask] == 0).all() and is_nm_sparse(m.weight)


def test_masks_kept_by_hf_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from modelopt_lite.plugins.hf import QATCallback

    model, toks = tiny_llama(), random_tokens(8, 32)
    mtl.sparsify(model, progress=False)
    data = [{"input_ids": t, "labels": t} for t in toks]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         callbacks=[QATCallback()]).train()
    for _, m in sparse_modules(model):
        assert (m.weight[~m.weight_mask] == 0).all()


@pytest.mark.parametrize("preset", ["int4_weight_only", "int8_smoothquant", "int4_awq_asym"])
def test_zeros_stay_zero_through_quantization(preset):
    from modelopt_lite.config import PRESETS, get_preset

    try:
        cfg = get_preset(preset)
    except Exception:
        pytest.skip(f"preset {preset} not available")
    if cfg.weight is not None and cfg.weight.granularity == "per_block":
        cfg = cfg.replace(weight=dataclasses.replace(cfg.weight, block_size=32))
    model, toks = tiny_llama(), random_tokens(2, 32)
    mtl.sparsify(model, progress=False)
    masks = {n: m.weight_mask.clone() for n, m in sparse_modules(model)}
    mtl.quantize(model, cfg, forward_loop=make_forward_loop(toks, progress=False), progress=False)
    assert PRESETS and "sparsity" in model._modelopt_lite
    n_q = 0
    for n, m in sparse_modules(model):
        assert torch.equal(m.weight_mask, masks[n])
        if is_quantized(m):
            n_q += 1
            wq = m.quantized_weight().detach()
            assert (wq[~masks[n]] == 0).all(), n
    assert n_q > 0


def test_asymmetric_int4_needs_the_mask_multiply():
    """Without the mask, an asymmetric zero point does not map 0 back to exactly 0."""
    model = tiny_llama()
    mtl.sparsify(model, progress=False)
    mtl.quantize(model, INT4_ASYM_32, progress=False)
    m = model.model.layers[0].mlp.up_proj
    raw = m.weight_from_2d(m.weight_quantizer(m.weight_2d())).detach()
    assert (raw[~m.weight_mask] != 0).any()
    assert (m.quantized_weight()[~m.weight_mask] == 0).all()


# --- checkpoints ---

def test_save_load_masks(tmp_path):
    toks = random_tokens(4, 32)
    model = mtl.sparsify(tiny_llama(), method="sparsegpt",
                         forward_loop=make_forward_loop(toks, progress=False), progress=False)
    mtl.save(model, tmp_path / "sparse")
    loaded = mtl.load(tiny_llama(seed=1), tmp_path / "sparse")
    assert len(sparse_modules(loaded)) == 14
    for (n, a), (_, b) in zip(sparse_modules(model), sparse_modules(loaded)):
        assert torch.equal(a.weight_mask, b.weight_mask) and torch.equal(a.weight, b.weight), n
    torch.testing.assert_close(loaded(toks).logits, model(toks).logits)
    apply_masks_(loaded)  # the training plugin finds the loaded masks


def test_save_load_sparse_then_quantized(tmp_path):
    toks = random_tokens(4, 32)
    model = mtl.sparsify(tiny_llama(), progress=False)
    mtl.quantize(model, INT4_ASYM_32, progress=False)
    mtl.save(model, tmp_path / "sq")
    loaded = mtl.load(tiny_llama(seed=1), tmp_path / "sq")
    assert "sparsity" in loaded._modelopt_lite and len(sparse_modules(loaded)) == 14
    torch.testing.assert_close(loaded(toks).logits, model(toks).logits)
    mtl.unquantize(loaded)
    assert "sparsity" in loaded._modelopt_lite


def _hessian_rank(rank, world, port, xs, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    acc = HessianAccumulator(xs.shape[-1])
    acc.add(xs[rank])
    h = acc.hessian()
    if rank == 0:
        out.copy_(h)
    dist.destroy_process_group()


def test_hessian_sums_across_ranks():
    import socket

    import torch.multiprocessing as mp

    xs = torch.randn(2, 50, 8)
    out = torch.zeros(8, 8).share_memory_()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_hessian_rank, args=(2, port, xs, out), nprocs=2, join=True)
    x = xs.reshape(100, 8)
    torch.testing.assert_close(out, 2 * x.T @ x / 100)


def test_sparse_weights_survive_onnx_export_and_trt_check_reports_them(tmp_path):
    pytest.importorskip("onnx")
    from modelopt_lite.export.onnx import export_onnx
    from modelopt_lite.export.trt_check import trt_check

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(),
                          nn.Linear(32, 8))
    mtl.sparsify(model, targets=["0", "2"], progress=False)
    x = torch.randn(4, 64)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: m(x), progress=False)
    export_onnx(model, x, tmp_path / "m.onnx")
    info = [f for f in trt_check(tmp_path / "m.onnx", info=True) if f.rule == "sparsity_2_4"]
    assert len(info) == 2, info
