"""Tiny random HF checkpoints of every supported family, made with `transformers` itself."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)

TINY = {
    "mixtral": dict(num_hidden_layers=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False, clip_qkv=3.0),
    "qwen3_moe": dict(num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
    "deepseek_v2": dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, head_dim=4, num_key_value_heads=4,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5),
    "deepseek_v3": dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, head_dim=4, num_key_value_heads=4,
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        rope_interleave=True),
}


def make_tiny(family: str, path: Path, seed: int = 0, max_shard_size: str | None = None):
    """Save a random `family` model with transformers; return the HF model (float32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**COMMON, **TINY[family]})
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than HF's init so routing is decisive and logits spread
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "gate" in name else 0.15))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def random_model(family: str, seed: int = 0):
    """Our MoEModel of `family` from the HF-style config dicts above, random weights (no
    transformers needed): what the device tests run on CPU and on CUDA."""
    from nodes.model.config import MoEConfig
    from nodes.model.model import MoEModel

    torch.manual_seed(seed)
    model = MoEModel(MoEConfig.from_hf_dict({"model_type": family, **COMMON, **TINY[family]}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in name else torch.randn(p.shape) * 0.2)
    return model.eval()
