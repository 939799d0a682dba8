"""Trainer plugins: HF Trainer and Lightning callbacks save and resume quantizer state, keep masks."""

import pytest
import torch
from torch import nn

from modelopt_lite.config import QuantConfig, QuantizerSpec
from modelopt_lite.qat import QATConfig, mode_of, prepare_qat, quantizers

INT4 = QuantConfig(weight=QuantizerSpec(num_bits=4, granularity="per_block", block_size=16),
                   exclude=("*lm_head*", "*embed*"))
QAT = QATConfig(lsq=True, freeze_after=4)


def add_24_mask(layer):
    w = layer.weight.detach()
    keep = w.abs().reshape(-1, 4).topk(2, dim=-1).indices
    mask = torch.zeros_like(w).reshape(-1, 4).scatter_(-1, keep, 1.0).reshape(w.shape)
    layer.register_buffer("weight_mask", mask)
    layer.weight.data.mul_(mask)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [mode_of(q) for _, q, _ in quantizers(a)] == [mode_of(q) for _, q, _ in quantizers(b)]


# --- Hugging Face Trainer ---

def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    add_24_mask(model.model.layers[0].mlp.up_proj)
    return prepare_qat(model, INT4, qat=QAT)


def token_dataset(n=24, seq=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_train(output_dir, resume=None, max_steps=6):
    from transformers import Trainer, TrainingArguments

    from modelopt_lite.plugins.hf import QATCallback
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_steps=2,
                             per_device_train_batch_size=4, learning_rate=5e-3,
                             report_to=[], use_cpu=True, logging_steps=100, seed=0,
                             disable_tqdm=True, save_strategy="steps", lr_scheduler_type="constant")
    model = tiny_llama()
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                      callbacks=[QATCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_hf_trainer_checkpoint_resume_round_trip(tmp_path):
    full = hf_train(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-2" / "modelopt_lite_qat.json").exists()
    assert full._modelopt_lite["qat"]["step"] == 6 and full._modelopt_lite["qat"]["frozen"]
    assert {mode_of(q) for _, q, _ in quantizers(full)} == {"learned_frozen"}
    hf_train(tmp_path / "cut", max_steps=2)  # as if stopped after step 2 (ranges still learning)
    resumed = hf_train(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed._modelopt_lite["qat"]["step"] == 6
    assert_same_state(resumed, full)
    up = resumed.model.layers[0].mlp.up_proj
    assert torch.all(up.weight[up.weight_mask == 0] == 0)


# --- Lightning ---

def lightning_module():
    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
            add_24_mask(self.model[0])
            prepare_qat(self.model, INT4.replace(exclude=()), qat=QAT)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 5e-3)

    return Tiny()


def lightning_loader():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, generator=g)  # two steps per epoch: checkpoints at epoch ends
    y = (x @ torch.randn(32, 4, generator=g)).argmax(-1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def lightning_train(ckpt_dir, max_steps, resume=None):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from modelopt_lite.plugins.lightning import QATCallback
    module = lightning_module()
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1,
                            filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, callbacks=[QATCallback(), saver], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(module, lightning_loader(), ckpt_path=resume)
    return module


def test_lightning_checkpoint_resume_round_trip(tmp_path):
    full = lightning_train(tmp_path / "full", 6)
    rec = full.model._modelopt_lite["qat"]
    assert rec["step"] == 6 and rec["frozen"]
    lightning_train(tmp_path / "cut", 2)
    resumed = lightning_train(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "step=2.ckpt"))
    assert resumed.model._modelopt_lite["qat"]["step"] == 6
    assert_same_state(resumed, full)
    layer = resumed.model[0]
    assert torch.all(layer.weight[layer.weight_mask == 0] == 0)


def test_plugins_import_lazily():
    import subprocess
    import sys
    code = ("import sys, modelopt_lite, modelopt_lite.qat, modelopt_lite.plugins.lightning; "
            "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
