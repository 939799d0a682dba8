"""Tiny transformer models built in code (random weights), one per architecture family."""

from __future__ import annotations

import torch

VOCAB = 128


def _finish(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.rand_like(p))  # non-trivial norm weights
    return model.eval()


def tiny_llama(seed=0, hidden=64, layers=2, heads=4, kv_heads=4, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=256)
    return _finish(LlamaForCausalLM(cfg), seed)


def tiny_gemma3(seed=0):
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=16, max_position_embeddings=256, sliding_window=32)
    return _finish(Gemma3ForCausalLM(cfg), seed)


def tiny_opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    return _finish(OPTForCausalLM(cfg), seed)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return _finish(GPT2LMHeadModel(cfg), seed)


def tiny_neox(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    return _finish(GPTNeoXForCausalLM(cfg), seed)


ALL = {"llama": tiny_llama, "gemma3": tiny_gemma3, "opt": tiny_opt, "gpt2": tiny_gpt2,
       "gpt_neox": tiny_neox}


def random_tokens(n=4, seq=32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


# --- mixture-of-experts (transformers 5 keeps the experts as fused 3-D weights) ---

def _moe(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():   # fused expert weights and biases: make every one non-trivial
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(0.05 * torch.randn_like(p))
    return _finish(model, seed)


def tiny_mixtral(seed=0, hidden=128, inter=256, experts=4, top_k=2, layers=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=top_k,
                        max_position_embeddings=256)
    return _moe(MixtralForCausalLM(cfg), seed)


def tiny_qwen2_moe(seed=0, hidden=128, inter=128, experts=8, top_k=2, layers=2):
    """Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=256,
                         moe_intermediate_size=inter, shared_expert_intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=experts, num_experts_per_tok=top_k,
                         max_position_embeddings=256, decoder_sparse_step=1)
    return _moe(Qwen2MoeForCausalLM(cfg), seed)


def tiny_gpt_oss(seed=0, hidden=128, inter=128, experts=4, top_k=2, layers=2):
    """GPT-OSS: transposed, interleaved gate/up expert weights with biases and a clamped
    SwiGLU of its own."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, num_local_experts=experts, num_experts_per_tok=top_k,
                       max_position_embeddings=256, sliding_window=32,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       layer_types=["sliding_attention", "full_attention"][:layers])
    return _moe(GptOssForCausalLM(cfg), seed)


_MOE_SIZES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                  moe_intermediate_size=128, shared_expert_intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=256, n_group=1, topk_group=1, first_k_dense_replace=1,
                  kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16,
                  v_head_dim=32)


def tiny_moe_from_config(model_type: str, seed=0):
    """A tiny MoE decoder of any transformers ``model_type`` whose config takes the usual size
    fields (DeepSeek's latent-attention dims included; its first layer stays dense)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    for key, value in _MOE_SIZES.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    if model_type.startswith("deepseek"):
        cfg.head_dim = cfg.qk_rope_head_dim
    torch.manual_seed(seed)
    return _moe(AutoModelForCausalLM.from_config(cfg), seed)


def tiny_llava(seed=0, text_layers=2, vision_layers=3):
    """Llava: a CLIP vision tower (more blocks than the language model has, as in PaliGemma),
    a projector and a Llama language model under ``model.language_model``. Images are 32 x 32
    pixels in 16 patches, each an image token (id :data:`IMAGE_TOKEN`) in the text."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-1, projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(cfg), seed)


IMAGE_TOKEN = VOCAB - 1


def tiny_gemma3_vlm(seed=0):
    """Gemma 3 with its SigLIP vision tower (``Gemma3ForConditionalGeneration``): the table's
    Gemma 3 row, with the layers under ``model.language_model``."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=32, max_position_embeddings=256, sliding_window=32)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=2, image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       image_token_id=IMAGE_TOKEN, boi_token_index=VOCAB - 2,
                       eoi_token_index=VOCAB - 3)
    return _finish(Gemma3ForConditionalGeneration(cfg), seed)


def tiny_git(seed=0):
    """GIT: BERT-style text layers at ``git.encoder.layer`` beside a CLIP image encoder with
    more blocks (``git.image_encoder``, from ``vision_config``); no ``text_config``, and the
    layers take their key/value cache positionally."""
    from transformers import GitConfig, GitForCausalLM

    torch.manual_seed(seed)
    cfg = GitConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, image_size=32, patch_size=8))
    return _finish(GitForCausalLM(cfg), seed)


def tiny_t5(seed=0):
    """T5: an encoder-decoder whose forward does not derive the decoder's inputs from the
    encoder's (BART's does); no ``decoder_start_token_id`` in the config (pad starts)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                   num_heads=4, pad_token_id=0, eos_token_id=1)
    return _finish(T5ForConditionalGeneration(cfg), seed)


def tiny_seq2seq(model_type, seed=0, **overrides):
    """A 2 + 2-layer encoder-decoder of ``model_type`` (``mt5``, ``umt5``, ``mbart``,
    ``pegasus``, ``m2m_100``, ``blenderbot``, ``whisper``, ...) with small sizes; Whisper's
    encoder reads 16 mel bins (``input_features`` [batch, 16, 64])."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    sizes = dict(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                 num_decoder_layers=2, num_heads=4, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                 decoder_ffn_dim=256, max_position_embeddings=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_mel_bins=16,
                 max_source_positions=32, max_target_positions=64)
    cfg = AutoConfig.for_model(model_type)
    for key, value in (sizes | overrides).items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    torch.manual_seed(seed)
    auto = AutoModelForSpeechSeq2Seq if model_type == "whisper" else AutoModelForSeq2SeqLM
    return _finish(auto.from_config(cfg), seed)


def tiny_longt5(seed=0):
    """LongT5: T5 with local attention in the encoder, whose mask it builds from blocks of
    the attention mask (and skips building while traced)."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LongT5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                       num_heads=4, pad_token_id=0, eos_token_id=1, local_radius=4)
    return _finish(LongT5ForConditionalGeneration(cfg), seed)


def tiny_encoder_classifier(model_type="bert", seed=0, labels=3):
    """A 2-layer encoder-only sequence classifier (``bert``, ``roberta``, ``deberta-v2``,
    ...): post-norm layers, GELU feed-forward, a pooled classification head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=64,
                               num_labels=labels, pad_token_id=0)
    torch.manual_seed(seed)
    return _finish(AutoModelForSequenceClassification.from_config(cfg), seed)


def tiny_vit(seed=0, labels=3):
    """A 2-layer ViT image classifier on 32 x 32 images in 8 x 8 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=256, num_labels=labels)
    torch.manual_seed(seed)
    return _finish(ViTForImageClassification(cfg), seed)


def tiny_cnn(seed=0, classes=10):
    """A plain CNN (an nn.Sequential: no stack of identical blocks): two convolutions, then a
    two-linear head."""
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                         nn.Linear(128, classes)).eval()
