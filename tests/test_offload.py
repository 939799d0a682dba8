"""Models dispatched by accelerate (device_map, CPU / disk offload): quantize(), sparsify(),
save, deploy and the summary give what they give on the same model held in memory, the
quantized model stays offloaded, and the user's checkpoint files are never written."""

import dataclasses
import hashlib
import logging

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from accelerate import cpu_offload, disk_offload, dispatch_model  # noqa: E402

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.calib.offload import OffloadedWeights, has_offloaded_weights  # noqa: E402
from tiny_models import random_tokens, tiny_llama, tiny_mixtral, tiny_t5  # noqa: E402

SIZES = dict(hidden=128, inter=256, layers=4)
MIXED = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(6, 32, seed=1)


def _offloaded(kind, tmp_path):
    model = tiny_llama(**SIZES)
    if kind == "cpu":     # every module's weights in accelerate's CPU state dict
        return cpu_offload(model, execution_device="cpu")
    if kind == "disk":    # every module's weights in .dat files
        return disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    return dispatch_model(model, device_map=MIXED, offload_dir=str(tmp_path / "offload"))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_fake_quant_forward_runs_under_accelerate_hooks(tokens):
    """dispatch_model hooks wrap each module's forward (module._old_forward): the class swap
    must reach it, or the layer silently computes in float."""
    model = dispatch_model(tiny_llama(**SIZES), device_map={"": "cpu"}, force_hooks=True)
    mtl.quantize(model, "int4_weight_only", calib=tokens, progress=False)
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_weight_only", calib=tokens, progress=False)
    x = torch.randn(3, SIZES["inter"])
    lin = model.model.layers[0].mlp.down_proj
    assert (lin(x) - torch.nn.functional.linear(x, lin.weight)).abs().max() > 1e-3
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    mtl.unquantize(model)   # and back: the float forward again
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))


@pytest.mark.parametrize("kind", ["cpu", "disk", "mixed"])
@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant", "w8a8", "int4_weight_only"])
def test_quantize_offloaded_equals_in_memory(preset, kind, tokens, tmp_path):
    cfg = dataclasses.replace(mtl.get_preset(preset), exclude=("*embed*",))   # lm_head too
    model = _offloaded(kind, tmp_path)
    mtl.quantize(model, cfg, calib=tokens, progress=False)
    ref = mtl.quantize(tiny_llama(**SIZES), cfg, calib=tokens, progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    # still offloaded: the processed weights live in the store, not in the model
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    assert has_offloaded_weights(model)
    store = OffloadedWeights(model)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.input_layernorm.weight",
                 "lm_head.weight"):
        assert torch.equal(store.read([name])[name], ref.get_parameter(name)), name
    # save reads the store; loading into a fresh float model gives the same function
    out = mtl.save(model, tmp_path / "q")
    fresh = mtl.load(tiny_llama(**SIZES), out)
    assert torch.equal(_logits(fresh, tokens), _logits(ref, tokens))
    assert "lm_head" in mtl.format_summary(model)   # SQNR of offloaded weights computed


@pytest.mark.parametrize("kind", ["cpu", "mixed"])
def test_deploy_offloaded(kind, tokens, tmp_path):
    model = _offloaded(kind, tmp_path)
    mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_awq", calib=tokens, progress=False)
    mtl.deploy(model)
    mtl.deploy(ref)
    down = model.model.layers[1].mlp.down_proj
    assert type(down).__name__ == "Int4Linear" and not down.qweight.is_meta
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))


def test_load_onto_an_offloaded_model(tokens, tmp_path):
    """A checkpoint loaded into a dispatched float model: offloaded weights go to the store,
    the ranges of offloaded layers into the layers; deployed layers land on the GPU side."""
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_awq", calib=tokens, progress=False)
    model = mtl.load(_offloaded("mixed", tmp_path / "a"), mtl.save(ref, tmp_path / "q"))
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    mtl.deploy(ref)
    model = mtl.load(_offloaded("mixed", tmp_path / "b"), mtl.save(ref, tmp_path / "d"))
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Int4Linear"
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_sparsify_offloaded(method, tokens, tmp_path):
    model = _offloaded("mixed", tmp_path)
    mtl.sparsify(model, "2:4", method, calib=tokens, progress=False)
    ref = mtl.sparsify(tiny_llama(**SIZES), "2:4", method, calib=tokens, progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    w = OffloadedWeights(model).read(["model.layers.2.mlp.up_proj.weight"])
    assert (w["model.layers.2.mlp.up_proj.weight"] == 0).float().mean() == 0.5


def test_from_pretrained_disk_offload_never_writes_the_checkpoint(tokens, tmp_path):
    """transformers points disk-offloaded entries at the checkpoint's own shards; processed
    weights go to .dat files in the offload folder instead."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_llama(**SIZES).save_pretrained(src)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(src, device_map=MIXED,
                                                 offload_folder=str(tmp_path / "off"))
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    ref = mtl.quantize(AutoModelForCausalLM.from_pretrained(src), "int4_awq", calib=tokens,
                       progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    rewritten = list((tmp_path / "off").glob("modelopt_lite_rewritten_*/*.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight.safetensors" in {p.name for p in rewritten}


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file()}


def test_offload_folder_files_are_never_rewritten(tokens, tmp_path):
    """accelerate reuses an offload folder that has an index.json: a second float model
    dispatched onto the folder after quantizing the first is still the float model."""
    folder = tmp_path / "off"
    model = disk_offload(tiny_llama(**SIZES), str(folder), execution_device="cpu")
    before = _digests(folder)
    mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    assert _digests(folder) == before
    again = disk_offload(tiny_llama(seed=5, **SIZES), str(folder), execution_device="cpu")
    assert torch.equal(_logits(again, tokens), _logits(tiny_llama(**SIZES), tokens))
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_awq", calib=tokens, progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))


def test_disk_offload_without_a_folder_stays_off_cpu_memory(tokens, tmp_path):
    """transformers reads disk-offloaded safetensors in place when no offload_folder is
    given; the rewritten tensors go to a folder of their own, not into CPU memory."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_llama(**SIZES).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, device_map=MIXED)
    loader = model.model.layers[1].mlp.up_proj._hf_hook.weights_map.dataset
    held = len(loader.state_dict)
    mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    assert len(loader.state_dict) == held
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_awq", calib=tokens, progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))


def test_unquantize_offloaded_folds_into_the_store(tokens, tmp_path):
    """unquantize folds the SmoothQuant multiply and rotation into the offloaded weights."""
    model = _offloaded("mixed", tmp_path)
    mtl.unquantize(mtl.quantize(model, "int8_smoothquant", calib=tokens, progress=False))
    ref = mtl.quantize(tiny_llama(**SIZES), "int8_smoothquant", calib=tokens, progress=False)
    mtl.unquantize(ref)
    assert torch.allclose(_logits(model, tokens), _logits(ref, tokens), atol=1e-5)
    assert (_logits(model, tokens) - _logits(tiny_llama(**SIZES), tokens)).abs().max() < 0.05


def test_encoder_decoder_offloaded(tmp_path):
    """Both stacks stream; the decoder calibrates on the processed (written back) encoder."""
    tokens = random_tokens(4, 16, seed=2)
    model = disk_offload(tiny_t5(), str(tmp_path / "off"), execution_device="cpu")
    mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    ref = mtl.quantize(tiny_t5(), "int4_awq", calib=tokens, progress=False)
    with torch.no_grad():
        a = model(input_ids=tokens, decoder_input_ids=tokens).logits
        b = ref(input_ids=tokens, decoder_input_ids=tokens).logits
    assert torch.equal(a, b)


def test_export_refuses_offloaded(tokens, tmp_path):
    from modelopt_lite.export import ExportError, export_onnx

    model = _offloaded("mixed", tmp_path)
    mtl.quantize(model, "w8a8", calib=tokens, progress=False)
    with pytest.raises(ExportError, match="accelerate offloads"):
        export_onnx(model, tokens[:1], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_fused_experts_offloaded_refused_before_any_change(tokens, tmp_path, caplog):
    model = cpu_offload(tiny_mixtral(), execution_device="cpu")
    before = [n for n, _ in model.named_modules()]
    with caplog.at_level(logging.WARNING), pytest.raises(NotImplementedError,
                                                         match="fused 3-D tensors"):
        mtl.quantize(model, "int4_awq", calib=tokens, progress=False)
    assert [n for n, _ in model.named_modules()] == before


def _gpu_map(devices):
    """Layers 0-1 on the first GPU, 2 on the last, 3 offloaded to the CPU, lm_head to disk."""
    return {"model.embed_tokens": devices[0], "model.layers.0": devices[0],
            "model.layers.1": devices[0], "model.layers.2": devices[-1], "model.layers.3": "cpu",
            "model.norm": devices[-1], "model.rotary_emb": devices[0], "lm_head": "disk"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant", "w8a8"])
def test_gpu_device_map(preset, gpus, tmp_path):
    """from_pretrained(device_map=...) over one or two GPUs with CPU and disk offload against
    the same model in GPU memory: the same quantized function (to GPU rounding)."""
    from transformers import AutoModelForCausalLM

    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    src = tmp_path / "src"
    tiny_llama(**SIZES).half().save_pretrained(src)
    devices = [f"cuda:{i}" for i in range(gpus)]
    model = AutoModelForCausalLM.from_pretrained(src, device_map=_gpu_map(devices),
                                                 offload_folder=str(tmp_path / "off"))
    tokens = random_tokens(6, 32, seed=1).cuda()
    mtl.quantize(model, preset, calib=tokens, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(src).cuda()
    mtl.quantize(ref, preset, calib=tokens, progress=False)
    a, b = _logits(model, tokens).float().cpu(), _logits(ref, tokens).float().cpu()
    assert ((a - b).norm() / b.norm()).item() < 2e-3
    assert "model.layers.3.mlp.up_proj" in mtl.format_summary(model)   # SQNR of offloaded
    assert model.model.layers[3].mlp.up_proj.weight.is_meta
    assert model.model.layers[2].mlp.up_proj.weight.device == torch.device(devices[-1])
    for name, m in mtl.layers.quant_modules(model):   # ranges live where their layer runs
        runs = (torch.device(m._hf_hook.execution_device) if m.weight.is_meta
                else m.weight.device)
        for q in (m.input_quantizer, m.weight_quantizer):
            assert q.amax is None or q.amax.device == runs, (name, q.amax.device, runs)
    if preset == "int4_awq":
        runs_on = torch.device(model.model.layers[3].mlp.up_proj._hf_hook.execution_device)
        mtl.deploy(model)
        mtl.deploy(ref)
        layer3 = model.model.layers[3].mlp.up_proj
        assert layer3.qweight.device == runs_on   # accelerate's main device (any of the GPUs)
        a, b = _logits(model, tokens).float().cpu(), _logits(ref, tokens).float().cpu()
        assert ((a - b).norm() / b.norm()).item() < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("preset", ["int4_awq", "int8_smoothquant", "w8a8"])
def test_gpu_split_over_two_gpus(preset, tmp_path):
    """A model split over two GPUs by from_pretrained(device_map=...), nothing offloaded (the
    usual way to load a model larger than one GPU): quantize() calibrates every layer where
    it lives and computes what the model on one GPU does; deploy() keeps each INT4 layer on
    its GPU."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_llama(**SIZES).half().save_pretrained(src)
    split = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1":
             "cuda:0", "model.layers.2": "cuda:1", "model.layers.3": "cuda:1",
             "model.norm": "cuda:1", "model.rotary_emb": "cuda:0", "lm_head": "cuda:1"}
    model = AutoModelForCausalLM.from_pretrained(src, device_map=split)
    tokens = random_tokens(6, 32, seed=1).cuda()
    mtl.quantize(model, preset, calib=tokens, progress=False)
    ref = mtl.quantize(AutoModelForCausalLM.from_pretrained(src).cuda(), preset, calib=tokens,
                       progress=False)
    a, b = _logits(model, tokens).float().cpu(), _logits(ref, tokens).float().cpu()
    assert ((a - b).norm() / b.norm()).item() < 2e-3
    for name, m in mtl.layers.quant_modules(model):
        assert m.weight.device == torch.device(split[".".join(name.split(".")[:3])]
                                               if name.startswith("model.layers") else
                                               split["lm_head"]), name
        for q in (m.input_quantizer, m.weight_quantizer):
            assert q.amax is None or q.amax.device == m.weight.device, name
    if preset == "int4_awq":
        mtl.deploy(model)
        mtl.deploy(ref)
        assert model.model.layers[3].mlp.up_proj.qweight.device == torch.device("cuda:1")
        a, b = _logits(model, tokens).float().cpu(), _logits(ref, tokens).float().cpu()
        assert ((a - b).norm() / b.norm()).item() < 2e-3


def test_offloaded_buffers(tokens):
    """A hook over a whole layer that offloads buffers too (place_submodules, offload_buffers)
    looks up every tensor of the layer in the store before each forward: the quantizer ranges
    the layer gains must be written there."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    model = tiny_llama(**SIZES)
    layer = model.model.layers[1]
    values = {f"model.layers.1.{k}": v.clone() for k, v in layer.state_dict().items()}
    add_hook_to_module(layer, AlignDevicesHook(
        execution_device="cpu", offload=True, offload_buffers=True, place_submodules=True,
        weights_map=PrefixedDataset(OffloadedWeightsLoader(state_dict=values), "model.layers.1.")))
    assert layer.mlp.up_proj.weight.is_meta
    mtl.quantize(model, "w8a8", calib=tokens, progress=False)
    ref = mtl.quantize(tiny_llama(**SIZES), "w8a8", calib=tokens, progress=False)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    assert "model.layers.1.mlp.up_proj.input_quantizer.amax" in values


def _buffer_hooked(layers=(1,)):
    """A model whose given layers sit under one hook that offloads buffers too."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    model = tiny_llama(**SIZES)
    for i in layers:
        layer = model.model.layers[i]
        values = {f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()}
        add_hook_to_module(layer, AlignDevicesHook(
            execution_device="cpu", offload=True, offload_buffers=True, place_submodules=True,
            weights_map=PrefixedDataset(OffloadedWeightsLoader(state_dict=values),
                                        f"model.layers.{i}.")))
    return model


def test_deploy_and_sparse_load_under_a_buffer_offloading_hook(tokens, tmp_path):
    model = mtl.quantize(_buffer_hooked(), "int4_awq", calib=tokens, progress=False)
    ref = mtl.quantize(tiny_llama(**SIZES), "int4_awq", calib=tokens, progress=False)
    mtl.deploy(model)
    mtl.deploy(ref)
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    sparse = mtl.sparsify(tiny_llama(**SIZES), "2:4", "magnitude", progress=False)
    out = mtl.save(sparse, tmp_path / "sparse")
    loaded = mtl.load(_buffer_hooked(), out)
    assert torch.equal(_logits(loaded, tokens), _logits(sparse, tokens))
