"""Layer streaming: a meta-device model read layer by layer from safetensors shards, or a CPU
model moved one layer at a time, must calibrate to exactly the in-memory result."""

import copy
import dataclasses

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.calib.sequential import run_sequential
from modelopt_lite.calib.streaming import (CheckpointError, LayerStreamer, SafetensorsCheckpoint,
                                           load_streaming, stream_layers)
from modelopt_lite.config import PRESETS, _load_builtins
from tiny_models import random_tokens, tiny_llama


def _presets():
    _load_builtins()
    return [p for p in ("w8a8", "int4_awq", "int8_smoothquant") if p in PRESETS]


def small_config(preset):
    """The preset with a short search grid where it has one (keeps the suite fast)."""
    cfg = PRESETS[preset]
    if hasattr(cfg.algorithm, "alpha_grid"):
        cfg = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, alpha_grid=(0.3, 0.6),
                                                        search_batches=2))
    return cfg


def _tiny(tied=False):
    model = tiny_llama(seed=3, layers=3, kv_heads=2)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _save(model, folder, shard="200KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k].to(sa[k].device))]
    assert not bad, f"differ: {bad[:5]}"


@pytest.mark.parametrize("preset", _presets())
def test_streamed_quantize_equals_in_memory(tmp_path, preset):
    model = _tiny()
    tokens = random_tokens(6, 16)
    cfg = small_config(preset)
    ref = mtl.quantize(copy.deepcopy(model), cfg, calib=tokens, progress=False)
    meta = load_streaming(_save(model, tmp_path))
    assert all(p.is_meta for p in meta.model.layers.parameters())
    with stream_layers(meta, "cpu") as streamer:
        mtl.quantize(meta, cfg, calib=tokens, progress=False)
        streamer.materialize_all("cpu")
    _assert_same_state(ref, meta)
    torch.testing.assert_close(meta(tokens).logits, ref(tokens).logits, rtol=0, atol=0)


def _recording_process(record, seen_meta=None, model=None):
    def process(i, name, layer, inputs):
        if seen_meta is not None:  # only the current layer holds weights
            others = [j for j, lay in enumerate(model.model.layers) if j > i
                      and not all(p.is_meta for p in lay.parameters())]
            seen_meta.append(others)
        stats = inputs.collect_stats(layer, {"mlp.down_proj": layer.mlp.down_proj})
        record[name] = stats["mlp.down_proj"].absmax.clone()
        with torch.no_grad():  # a change the next layer must see
            layer.mlp.down_proj.weight.mul_(0.5)
    return process


def test_run_sequential_streamed_equals_in_memory(tmp_path):
    model = _tiny(tied=True)
    loop = mtl.calib.runner.make_forward_loop(random_tokens(5, 12), batch_size=2, progress=False)
    ref_rec, rec, seen = {}, {}, []
    ref = copy.deepcopy(model)
    run_sequential(ref, loop, _recording_process(ref_rec), progress=False)
    meta = load_streaming(_save(model, tmp_path))
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # ties survive loading
    assert len(SafetensorsCheckpoint(tmp_path).files) > 0 and len(
        {f for f in SafetensorsCheckpoint(tmp_path).files.values()}) > 1  # sharded checkpoint
    with stream_layers(meta, "cpu", store_device="cpu"):
        run_sequential(meta, loop, _recording_process(rec, seen, meta), progress=False)
    assert seen == [[], [], []]
    assert ref_rec.keys() == rec.keys()
    for k in rec:
        assert torch.equal(ref_rec[k], rec[k])
    _assert_same_state(ref, meta)


def test_cpu_model_streams_and_offloads(tmp_path):
    model = _tiny()
    tokens = random_tokens(4, 16)
    ref = mtl.quantize(copy.deepcopy(model), "w8a8", calib=tokens, progress=False)
    with stream_layers(model, "cpu", offload="cpu"):
        mtl.quantize(model, "w8a8", calib=tokens, progress=False)
    _assert_same_state(ref, model)


def test_offload_meta_hands_each_layer_to_sink(tmp_path):
    model = _tiny()
    loop = mtl.calib.runner.make_forward_loop(random_tokens(3, 12), progress=False)
    ref = copy.deepcopy(model)
    run_sequential(ref, loop, _recording_process({}), progress=False)
    kept = {}

    def sink(i, name, layer):
        kept.update({f"{name}.{k}": v.clone() for k, v in layer.state_dict().items()})

    meta = load_streaming(_save(model, tmp_path))
    with stream_layers(meta, "cpu", offload="meta", sink=sink):
        run_sequential(meta, loop, _recording_process({}), progress=False)
    assert all(p.is_meta for p in meta.model.layers.parameters())  # nothing resident
    want = {k: v for k, v in ref.state_dict().items() if k.startswith("model.layers.")}
    assert kept.keys() == want.keys()
    for k in want:
        assert torch.equal(kept[k], want[k]), k


def test_errors_teach(tmp_path):
    model = _tiny()
    _save(model, tmp_path)
    meta = load_streaming(tmp_path)
    with pytest.raises(ValueError, match="sink"):
        LayerStreamer(meta, "cpu", offload="meta")
    with pytest.raises(ValueError, match="checkpoint"):
        LayerStreamer(_tiny(), "cpu", offload="meta", sink=lambda *a: None)
    ckpt = meta._modelopt_lite_checkpoint
    del ckpt.files["model.layers.1.mlp.up_proj.weight"]
    with stream_layers(meta, "cpu"), pytest.raises(CheckpointError, match="up_proj"):
        mtl.quantize(meta, "w8a8", calib=random_tokens(2, 8), progress=False)
    with pytest.raises(CheckpointError, match="safetensors"):
        SafetensorsCheckpoint(tmp_path / "nothing")


@pytest.mark.gpu
def test_gpu_holds_about_one_layer(tmp_path):
    model = tiny_llama(seed=0, hidden=256, layers=6, inter=1024)
    tokens = random_tokens(4, 32)
    ref = mtl.quantize(copy.deepcopy(model), "w8a8", calib=tokens, progress=False)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    meta = load_streaming(_save(model, tmp_path, "2MB"))
    # cuBLAS takes its workspace (32 MiB on Hopper) from the caching allocator on first use:
    # allocate it first and count only what calibration adds on top
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with stream_layers(meta, "cuda") as streamer:
        mtl.quantize(meta, "w8a8", calib=tokens, progress=False)
        streamer.materialize_all("cpu")
    assert torch.cuda.max_memory_allocated() - base < 3 * layer_bytes
    sa, sb = ref.state_dict(), meta.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k].cpu(), sa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_streamed_ranges_stay_with_their_layers():
    """CPU-resident layers streamed onto the GPU for w8a8's whole-model calibration pass: the
    activation ranges end on the CPU beside their layers' weights, so the quantized model runs
    where it is, as the model quantized in CPU memory does."""
    model = tiny_llama(seed=0)
    tokens = random_tokens(4, 32)
    ref = mtl.quantize(copy.deepcopy(model), "w8a8", calib=tokens, progress=False)
    with stream_layers(model, "cuda"):
        mtl.quantize(model, "w8a8", calib=tokens, progress=False)
    for name, m in mtl.layers.quant_modules(model):
        assert m.input_quantizer.amax.device == m.weight.device == torch.device("cpu"), name
    with torch.no_grad():
        got, want = model(tokens).logits, ref(tokens).logits
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("preset", _presets())
def test_encoder_decoder_streams_both_stacks_as_in_memory(tmp_path, preset):
    """T5 from a safetensors folder, both stacks on meta: the encoder's layers stream first,
    then the decoder's, whose inputs (the encoder's states, and the position biases its
    first layer hands on) come from a pass through the processed encoder, one layer at a
    time. The result equals the in-memory quantization exactly."""
    from tiny_models import tiny_t5

    model = tiny_t5(seed=1)
    tokens = random_tokens(4, 16)
    cfg = small_config(preset)
    ref = mtl.quantize(copy.deepcopy(model), cfg, calib=tokens, progress=False)
    meta = load_streaming(_save(model, tmp_path))
    assert type(meta).__name__ == "T5ForConditionalGeneration"
    assert all(p.is_meta for stack in (meta.encoder.block, meta.decoder.block)
               for p in stack.parameters())
    with stream_layers(meta, "cpu") as streamer:
        assert [path for path, _ in streamer.stacks()] == ["encoder.block", "decoder.block"]
        mtl.quantize(meta, cfg, calib=tokens, progress=False)
        streamer.materialize_all("cpu")
    _assert_same_state(ref, meta)
    dec = mtl.calib.runner.decoder_inputs(ref, tokens)
    torch.testing.assert_close(meta(tokens, **dec).logits, ref(tokens, **dec).logits,
                               rtol=0, atol=0)


def test_encoder_decoder_refuses_offload_meta(tmp_path):
    from tiny_models import tiny_t5

    meta = load_streaming(_save(tiny_t5(), tmp_path))
    with pytest.raises(ValueError, match="encoder-decoder.*offload='cpu'"):
        LayerStreamer(meta, "cpu", offload="meta", sink=lambda *a: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoder_decoder_streams_on_gpu(tmp_path):
    """T5 streamed onto the GPU a layer at a time (the embeddings and final norms on the CPU
    side) computes what the model quantized whole on the GPU does: up to the 8-bit rounding
    flips that other GPU batch shapes cause (measured 2.5e-3 on an H200); a wrong input,
    such as a missing position bias, is off by O(1)."""
    from tiny_models import tiny_t5

    model = tiny_t5(seed=1)
    tokens = random_tokens(4, 16)
    cfg = small_config("int8_smoothquant")
    ref = mtl.quantize(copy.deepcopy(model).cuda(), cfg, calib=tokens, progress=False).cpu()
    meta = load_streaming(_save(model, tmp_path))
    with stream_layers(meta, "cuda") as streamer:
        mtl.quantize(meta, cfg, calib=tokens, progress=False)
        streamer.materialize_all("cpu")
    dec = mtl.calib.runner.decoder_inputs(ref, tokens)
    with torch.no_grad():
        got, want = meta(tokens, **dec).logits, ref(tokens, **dec).logits
    assert ((got - want).norm() / want.norm()).item() < 2e-2
