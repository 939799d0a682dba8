"""save/load: round trip onto a fresh float model, atomic saves, shape and version checks."""

import json

import pytest
import torch
from torch import nn

import modelopt_lite as mtl
from modelopt_lite.io import MANIFEST, CheckpointError
from modelopt_lite.nn import is_quantized
from tiny_models import ALL, random_tokens


def _quantized_llama(seed=0):
    model = ALL["llama"](seed=seed)
    calib = random_tokens(n=4, seq=16, seed=1)
    mtl.quantize(model, "w8a8", forward_loop=lambda m: [m(r[None]) for r in calib],
                 progress=False)
    return model


def test_round_trip_restores_quantizers_and_outputs(tmp_path):
    model = _quantized_llama()
    with torch.no_grad():  # make a weight differ from the fresh model's (as a fold would)
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    tokens = random_tokens(n=2, seq=16)
    ref = model(tokens).logits
    mtl.save(model, tmp_path / "ckpt")
    fresh = ALL["llama"](seed=0)
    mtl.load(fresh, tmp_path / "ckpt")
    assert torch.equal(fresh(tokens).logits, ref)
    assert sum(is_quantized(m) for m in fresh.modules()) == sum(
        is_quantized(m) for m in model.modules())
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr() or \
        not model.config.tie_word_embeddings


def test_load_refuses_a_different_shape(tmp_path):
    mtl.save(_quantized_llama(), tmp_path)
    other = ALL["llama"](hidden=32)
    with pytest.raises(CheckpointError, match="shape .* != model shape"):
        mtl.load(other, tmp_path)
    assert not any(is_quantized(m) for m in other.modules())


def test_load_refuses_newer_format(tmp_path):
    mtl.save(_quantized_llama(), tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer than this modelopt_lite reads"):
        mtl.load(ALL["llama"](), tmp_path)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _quantized_llama()
    mtl.save(model, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    import safetensors.torch

    def crash(*args, **kwargs):
        open(args[1], "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        mtl.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.undo()
    fresh = ALL["llama"]()
    mtl.load(fresh, tmp_path)  # still loads
    tokens = random_tokens(n=1, seq=8)
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def test_checkpoint_holds_no_pickles(tmp_path):
    mtl.save(_quantized_llama(), tmp_path)
    names = {p.suffix for p in tmp_path.iterdir()}
    assert names == {".json", ".safetensors"}


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(CheckpointError, match="not quantized"):
        mtl.save(nn.Linear(4, 4), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deployed_round_trip(tmp_path, arch):
    """deploy() then save(): the checkpoint holds the packed INT4 layers (a fraction of the
    fake-quant checkpoint's bytes) and load() rebuilds them as Int4Linear on a fresh float
    model, with the same outputs; the layers left fake-quant come back as they were."""
    from modelopt_lite.config import QuantConfig, QuantizerSpec
    from modelopt_lite.nn.int4_linear import Int4Linear

    model = ALL[arch]()
    mtl.quantize(model, QuantConfig(weight=QuantizerSpec(
        num_bits=4, granularity="per_block", block_size=32, symmetric=False)), progress=False)
    mtl.save(model, tmp_path / "fake")
    mtl.deploy(model)
    tokens = random_tokens(n=2, seq=12)
    with torch.no_grad():
        ref = model(tokens).logits
    mtl.save(model, tmp_path / "int4")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("model-*.safetensors"))
            for d in ("fake", "int4")}
    fresh = mtl.load(ALL[arch](seed=7), tmp_path / "int4")
    n_int4 = sum(isinstance(m, Int4Linear) for m in fresh.modules())
    assert n_int4 == sum(isinstance(m, Int4Linear) for m in model.modules()) > 0
    assert size["int4"] < size["fake"]
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, ref)
