"""deploy(): INT4 fake-quant layers become Int4Linear and compute the same function."""

import pytest
import torch

import modelopt_lite as mtl
from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.nn import is_quantized
from tiny_models import ALL, random_tokens


@pytest.mark.parametrize("arch,symmetric", [("llama", True), ("llama", False), ("gemma3", False),
                                            ("opt", True), ("gpt2", False), ("gpt_neox", True)])
def test_deploy_matches_fake_quant_model(arch, symmetric):
    """Every architecture family, including GPT-2's Conv1D layers (weights stored [in, out])."""
    from modelopt_lite.nn.int4_linear import Int4Linear

    model = ALL[arch]()
    cfg = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=32,
                                           symmetric=symmetric))
    mtl.quantize(model, cfg, progress=False)
    n_quant = sum(is_quantized(m) for m in model.modules())
    tokens = random_tokens(n=2, seq=12)
    with torch.no_grad():
        ref = model(tokens).logits
    mtl.deploy(model)
    assert not any(is_quantized(m) for m in model.modules())
    n_int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    assert n_int4 == n_quant
    if arch == "llama":
        assert n_int4 == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    with torch.no_grad():
        out = model(tokens).logits
    # Int4Linear keeps scales in fp16: agreement to fp16 rounding, not bit for bit
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3
