"""`MoEConfig`: one dataclass for every supported family, read from an HF `config.json`.

Families and what sets them apart (everything else is a plain pre-norm decoder):

| family       | attention                  | router                                   | shared expert          |
|--------------|----------------------------|------------------------------------------|------------------------|
| mixtral      | GQA                        | softmax -> top-k -> renormalise          | none                   |
| qwen2_moe    | GQA, q/k/v bias            | softmax -> top-k (renormalise if asked)  | 1, sigmoid-gated       |
| olmoe        | GQA, RMSNorm on full q, k  | softmax -> top-k (renormalise if asked)  | none                   |
| qwen3_moe    | GQA, RMSNorm per q/k head  | softmax -> top-k (renormalise if asked)  | none                   |
| deepseek_v2  | MLA (latent KV cache)      | softmax -> (group-limited) top-k x scale | n, ungated; dense first layers |
| deepseek_v3  | MLA                        | sigmoid + bias -> group top-k -> norm x scale | n, ungated; dense first layers |

Layer numbering: ``decoder layer`` = index into the transformer stack; ``MoE layer`` = ordinal
among the layers that have a routed-expert block (DeepSeek's dense first layers have none).
The mesh, the predictors and the allocator all speak MoE-layer ordinals; `moe_layer_ids` maps
an ordinal to its decoder layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


class UnsupportedModel(ValueError):
    """The checkpoint's config names a family or option this code does not implement."""


YARN_FAMILIES = ("deepseek_v2", "deepseek_v3")  # where YaRN is implemented and tested against HF


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (arXiv 2309.00071) as DeepSeek-V2/V3 and HF `transformers` apply it.

    `inv_freq` blends interpolated (theta^(-2i/d) / factor) and original frequencies with a linear
    ramp between the dimensions that make `beta_fast` and `beta_slow` rotations over
    `original_max_position_embeddings`; cos/sin are multiplied by `attention_factor`; the
    attention softmax scale by `softmax_mscale` (from `mscale_all_dim`, DeepSeek only).
    """

    type: str  # "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float = 1.0  # multiplies cos and sin
    truncate: bool = True

    @property
    def softmax_mscale(self) -> float:
        """Factor on the attention softmax scale: yarn_get_mscale(factor, mscale_all_dim) ** 2."""
        if not self.mscale_all_dim:
            return 1.0
        return yarn_get_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MoEConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    dense_intermediate_size: int  # MLP width of layers without routed experts
    # attention variants
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "full" (OLMoE: over all heads) | "head" (Qwen3: per head)
    clip_qkv: float | None = None
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # routed experts
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate_size: int = 0
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    # shared experts
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    moe_layer_ids: tuple[int, ...] = ()
    eos_token_id: int | None = None
    rope_scaling: RopeScaling | None = None  # None = plain rotary (rope_type "default")

    @property
    def attention(self) -> str:
        return "mla" if self.kv_lora_rank else "gqa"

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    def moe_ordinal(self, decoder_layer: int) -> int | None:
        try:
            return self.moe_layer_ids.index(decoder_layer)
        except ValueError:
            return None

    @staticmethod
    def from_hf_dict(raw: dict, source: str = "config.json") -> MoEConfig:
        return _from_hf(raw, source)

    @staticmethod
    def from_file(path: str | Path) -> MoEConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; a model directory needs the HF layout "
                                    "(config.json, model.safetensors, tokenizer.json)") from None
        return _from_hf(raw, str(path))


def _from_hf(raw: dict, source: str) -> MoEConfig:
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModel(f"{source}: model_type {family!r} is not supported; "
                               f"supported families: {', '.join(FAMILIES)}")

    def need(*keys: str):
        for key in keys:
            if raw.get(key) is not None:
                return raw[key]
        raise UnsupportedModel(f"{source}: {family} config lacks {' or '.join(keys)}")

    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_scaling = _rope_scaling(raw, rope, family, source)

    layers = int(need("num_hidden_layers"))
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    common = dict(
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dense_intermediate_size=int(raw.get("intermediate_size") or 0),
        num_experts=int(need("num_experts", "num_local_experts", "n_routed_experts")),
        top_k=int(need("num_experts_per_tok")),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        eos_token_id=_first(raw.get("eos_token_id")),
        rope_scaling=rope_scaling,
    )
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{source}: hidden_act {raw.get('hidden_act')!r}: only silu (SwiGLU)")

    if family == "mixtral":
        return MoEConfig(**{**common, "norm_topk_prob": True},
                         expert_intermediate_size=int(need("intermediate_size")),
                         moe_layer_ids=tuple(range(layers)))
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(raw.get("decoder_sparse_step", 1))
        dense_only = set(raw.get("mlp_only_layers") or [])
        moe_ids = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        shared = int(raw.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0
        return MoEConfig(
            **common,
            qkv_bias=bool(raw.get("qkv_bias", True)) if family == "qwen2_moe"
            else bool(raw.get("attention_bias", False)),
            o_bias=False,
            qk_norm="head" if family == "qwen3_moe" else "none",
            expert_intermediate_size=int(need("moe_intermediate_size")),
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            moe_layer_ids=moe_ids,
        )
    if family == "olmoe":
        bias = bool(raw.get("attention_bias", False))
        return MoEConfig(**common, qkv_bias=bias, o_bias=bias, qk_norm="full",
                         clip_qkv=raw.get("clip_qkv"),
                         expert_intermediate_size=int(need("intermediate_size")),
                         moe_layer_ids=tuple(range(layers)))
    # deepseek_v2 / deepseek_v3: multi-head latent attention, shared experts, dense first layers
    first_dense = int(raw.get("first_k_dense_replace", 0))
    if raw.get("attention_bias"):
        raise UnsupportedModel(f"{source}: attention_bias=true is not implemented for {family}")
    v3 = family == "deepseek_v3"
    if v3 and not raw.get("rope_interleave", True):
        raise UnsupportedModel(f"{source}: rope_interleave=false is not implemented for deepseek_v3")
    common["head_dim"] = int(need("qk_rope_head_dim"))
    return MoEConfig(
        **common,
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        expert_intermediate_size=int(need("moe_intermediate_size")),
        scoring="sigmoid" if v3 else "softmax",
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        topk_method="noaux_tc" if v3 else str(raw.get("topk_method", "greedy")),
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        shared_intermediate_size=int(raw.get("moe_intermediate_size", 0)) * int(raw.get("n_shared_experts") or 0),
        moe_layer_ids=tuple(range(first_dense, layers)),
    )


def _rope_scaling(raw: dict, rope: dict, family: str, source: str) -> RopeScaling | None:
    """The `rope_scaling` / `rope_parameters` entry -> RopeScaling, None for plain rotary."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    if rope_type != "yarn":
        raise UnsupportedModel(f"{source}: {key}.rope_type {rope_type!r} is not implemented "
                               "(only 'default' and, for DeepSeek, 'yarn'); see nodes/model/layers.py Rotary")
    if family not in YARN_FAMILIES:
        raise UnsupportedModel(f"{source}: {key}.rope_type 'yarn' is implemented only for "
                               f"{', '.join(YARN_FAMILIES)}, not {family}")
    max_positions = raw.get("max_position_embeddings")
    original = rope.get("original_max_position_embeddings") or max_positions
    factor = rope.get("factor")
    if factor is None:  # as HF: the ratio of the extended to the original context
        if not (max_positions and original):
            raise UnsupportedModel(f"{source}: {key} of type yarn needs 'factor' "
                                   "(or max_position_embeddings and original_max_position_embeddings)")
        factor = max_positions / original
    if not original:
        raise UnsupportedModel(f"{source}: {key} of type yarn needs original_max_position_embeddings")
    factor = float(factor)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return RopeScaling(
        type="yarn", factor=factor, original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=None if mscale is None else float(mscale),
        mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim),
        attention_factor=float(attention_factor), truncate=bool(rope.get("truncate", True)),
    )


def _first(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)
