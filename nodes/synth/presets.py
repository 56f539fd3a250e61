"""Presets: the real configs of three MoE models, and how their synthetic router is tuned.

Each `Preset` holds the model's real HF `config.json` (every field that shapes a tensor is the
real one; values from the models' Hugging Face repositories), its real depth and vocabulary,
and a `RoutingProfile`, the knobs of the structured weights that make the model's own gates
route like the real model (see design.py and docs/synth/routing.md):

| preset              | family      | hidden | routed experts | top-k | shared            | attention       | layers | vocab   |
|---------------------|-------------|--------|----------------|-------|-------------------|-----------------|--------|---------|
| qwen1.5-moe-a2.7b   | qwen2_moe   | 2048   | 60 x 1408      | 4     | 1 x 5632, sigmoid-gated | GQA 16/16, qkv bias | 24 | 151,936 |
| deepseek-v2-lite    | deepseek_v2 | 2048   | 64 x 1408      | 6     | 2 x 1408 (one MLP of 2816) | MLA, YaRN x40 | 27 (layer 0 dense, 10944) | 102,400 |
| mixtral-8x7b        | mixtral     | 4096   | 8 x 14336      | 2     | none              | GQA 32/8        | 32     | 32,000  |

A synthetic checkpoint keeps every per-layer shape and takes fewer layers; its vocabulary is
the bundled 2,048-token tokenizer's (sizes.py gives the byte accounting against the real model).
`<name>-small` variants keep the family, the structure, the expert count and top-k, with narrow
widths: what the tests and the routing calibration run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

BUNDLED_VOCAB = 2048  # nodes/bundled/tokenizer.json


@dataclass(frozen=True)
class RoutingProfile:
    """Knobs of the synthetic router (design.py); depth curves are (first, middle, last) MoE layer.

    code_dim:   D, the size of the routing code every token carries in the residual stream
    semantic:   share of a token's code taken from the bundled model's trained embedding
                (similar tokens route alike), the rest a random code per token id
    window:     std (tokens) of the recency window of the context head (layer attention)
    ctx_write:  (layer 0, later layers): how much each layer's context head writes
    token_mix:  weight of the token's own code in the gate logits, over depth
    ctx_mix:    weight of the context (recent tokens' codes) in the gate logits, over depth
    skew:       std of the per-expert logit bias (global imbalance)
    noise:      per-coordinate std that each expert / MLP output adds to the routing code
    gate_gain:  logit scale of the gate (softmax sharpness; top-k does not depend on it)
    gate_corr:  correlation of a layer's gate with the previous layer's (with a random
                permutation of expert ids: inter-layer affinity, not the same ids)
    """

    code_dim: int = 64
    semantic: float = 0.5
    window: float = 16.0
    ctx_write: tuple[float, float] = (1.0, 0.3)
    token_mix: tuple[float, float, float] = (1.0, 0.6, 0.8)
    ctx_mix: tuple[float, float, float] = (0.2, 1.0, 0.6)
    skew: float = 0.3
    noise: float = 0.15
    gate_gain: float = 3.0
    gate_corr: float = 0.5


@dataclass(frozen=True)
class Preset:
    name: str
    real_config: dict  # the real model's config.json (full depth, real vocabulary)
    routing: RoutingProfile = field(default_factory=RoutingProfile)
    default_layers: int = 4  # what fits this machine (24 GB) in bf16, and loads in float32
    small_overrides: dict = field(default_factory=dict)  # the -small variant's config changes
    small_of: str | None = None  # set on -small variants: the full preset's name

    @property
    def family(self) -> str:
        return self.real_config["model_type"]

    @property
    def real_layers(self) -> int:
        return int(self.real_config["num_hidden_layers"])

    @property
    def real_vocab(self) -> int:
        return int(self.real_config["vocab_size"])

    def hf_config(self, layers: int, vocab: int = BUNDLED_VOCAB) -> dict:
        """config.json of a `layers`-layer synthetic checkpoint with a `vocab`-token vocabulary."""
        first_dense = int(self.real_config.get("first_k_dense_replace", 0))
        if layers < 1 or layers <= first_dense:
            raise ValueError(f"{self.name}: --layers {layers} leaves no MoE layer (the first {first_dense} "
                             f"are dense); give at least {first_dense + 1}")
        if layers > self.real_layers:
            raise ValueError(f"{self.name}: the real model has {self.real_layers} layers; --layers {layers} is more")
        config = dict(self.real_config, num_hidden_layers=layers, vocab_size=vocab,
                      bos_token_id=None, eos_token_id=0, tie_word_embeddings=False)
        if "max_window_layers" in config:
            config["max_window_layers"] = min(config["max_window_layers"], layers)
        return config

    def small(self) -> Preset:
        return replace(self, name=f"{self.name}-small", small_of=self.name,
                       real_config={**self.real_config, **self.small_overrides}, default_layers=4)


QWEN = Preset(
    name="qwen1.5-moe-a2.7b",
    real_config={  # Qwen/Qwen1.5-MoE-A2.7B config.json
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "decoder_sparse_step": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
        "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
        "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    # calibrated on the -small variant (docs/synth/routing.md): near-uniform, weakly local
    routing=RoutingProfile(skew=0.0, ctx_mix=(0.4, 1.3, 0.9), window=24.0, noise=0.2),
    default_layers=4,  # 4.6 GB bf16
    small_overrides={"hidden_size": 256, "intermediate_size": 128, "moe_intermediate_size": 32,
                     "shared_expert_intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4},
)

DEEPSEEK_V2_LITE = Preset(
    name="deepseek-v2-lite",
    real_config={  # deepseek-ai/DeepSeek-V2-Lite config.json
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
        "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
        "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "v_head_dim": 128, "vocab_size": 102400,
    },
    # more skewed and more local than Qwen
    routing=RoutingProfile(skew=0.1, ctx_mix=(1.0, 2.2, 1.5), window=32.0),
    default_layers=4,  # layer 0 dense + 3 MoE layers, 3.6 GB bf16
    small_overrides={"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 32,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 128,
                     "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 64},
)

MIXTRAL = Preset(
    name="mixtral-8x7b",
    real_config={  # mistralai/Mixtral-8x7B-v0.1 config.json
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 32000,
    },
    # layer 0 near-random, middle layers most consistent (Mixtral paper, Table 5)
    routing=RoutingProfile(skew=0.05, ctx_mix=(0.05, 1.0, 0.7), token_mix=(1.0, 0.6, 0.9)),
    default_layers=2,  # 5.6 GB bf16
    small_overrides={"hidden_size": 256, "intermediate_size": 64, "num_attention_heads": 4,
                     "num_key_value_heads": 2},
)

_FULL = (QWEN, DEEPSEEK_V2_LITE, MIXTRAL)
PRESETS: dict[str, Preset] = {p.name: p for p in _FULL} | {p.small().name: p.small() for p in _FULL}


class UnknownPreset(KeyError):
    def __str__(self) -> str:
        return f"unknown preset {self.args[0]!r}; choose one of: {', '.join(PRESETS)}"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(name) from None
