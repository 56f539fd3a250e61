"""Bytes per layer from shapes alone: expert vs non-expert, synthetic slice vs the real model.

"Expert" = the routed experts (what the mesh can move to functions); "non-expert" = everything
else a layer holds (attention, norms, router, shared experts, a dense layer's MLP). Embeddings
and the LM head are counted apart, because the synthetic checkpoints swap the real vocabulary
(151,936 / 102,400 / 32,000 tokens) for the bundled 2,048-token one.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.model.config import MoEConfig

from .presets import BUNDLED_VOCAB, Preset
from .writer import tensor_plan

BF16 = 2


@dataclass(frozen=True)
class LayerBytes:
    expert: int
    non_expert: int

    @property
    def ratio(self) -> float:
        return self.expert / self.non_expert


@dataclass(frozen=True)
class ModelBytes:
    layers: list[LayerBytes]  # one per decoder layer
    embeddings: int  # embed_tokens + lm_head + final norm

    @property
    def expert(self) -> int:
        return sum(x.expert for x in self.layers)

    @property
    def total(self) -> int:
        return self.expert + sum(x.non_expert for x in self.layers) + self.embeddings

    @property
    def expert_share(self) -> float:
        return self.expert / self.total


def model_bytes(config: MoEConfig) -> ModelBytes:
    """Bytes (bf16) per decoder layer and for the embeddings, from the tensor plan (no weights)."""
    layers = [[0, 0] for _ in range(config.num_layers)]
    embeddings = 0
    for name, shape in tensor_plan(config):
        n = BF16
        for s in shape:
            n *= s
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            layers[layer][0 if ".mlp.experts." in name else 1] += n
        else:
            embeddings += n
    return ModelBytes([LayerBytes(e, o) for e, o in layers], embeddings)


def compare(preset: Preset, layers: int | None = None, vocab: int = BUNDLED_VOCAB) -> dict:
    """Per-layer expert/non-expert bytes of the synthetic slice against the real model."""
    layers = layers or preset.default_layers
    real = model_bytes(MoEConfig.from_hf_dict(preset.real_config, preset.name))
    synth = model_bytes(MoEConfig.from_hf_dict(preset.hf_config(layers, vocab), preset.name))
    moe = next(i for i, x in enumerate(real.layers) if x.expert)
    return {
        "preset": preset.name, "layers": layers, "vocab": vocab, "real_vocab": preset.real_vocab,
        "moe_layer_expert_bytes": synth.layers[moe].expert, "moe_layer_non_expert_bytes": synth.layers[moe].non_expert,
        "real_moe_layer_ratio": real.layers[moe].ratio, "synth_moe_layer_ratio": synth.layers[moe].ratio,
        "per_layer_ratio_error": abs(synth.layers[moe].ratio / real.layers[moe].ratio - 1),
        "real_total_bytes": real.total, "real_expert_share": real.expert_share,
        "real_embedding_bytes": real.embeddings,
        "synth_total_bytes": synth.total, "synth_expert_share": synth.expert_share,
        "synth_embedding_bytes": synth.embeddings,
        # the real model's first `layers` layers with its real vocabulary, for comparison
        "real_slice_expert_share": sum(x.expert for x in real.layers[:layers])
        / (sum(x.expert + x.non_expert for x in real.layers[:layers]) + real.embeddings),
    }


def markdown(names: tuple[str, ...] = ("qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b")) -> str:
    """The byte table of docs/synth/routing.md (`python -m nodes.synth.sizes`)."""
    from .presets import PRESETS

    lines = ["| preset | MoE layer: expert / non-expert bytes | ratio synth / real (error) | real model: total, expert share, embeddings | synthetic default slice: layers, total, expert share, embeddings | real model's first layers with its real vocabulary: expert share |",
             "|---|---|---|---|---|---|"]
    for name in names:
        r = compare(PRESETS[name])
        lines.append(
            f"| {name} | {r['moe_layer_expert_bytes'] / 1e6:,.0f} MB / {r['moe_layer_non_expert_bytes'] / 1e6:,.0f} MB "
            f"| {r['synth_moe_layer_ratio']:.2f} / {r['real_moe_layer_ratio']:.2f} ({100 * r['per_layer_ratio_error']:.1f}%) "
            f"| {r['real_total_bytes'] / 1e9:.1f} GB, {100 * r['real_expert_share']:.1f}%, "
            f"{r['real_embedding_bytes'] / 1e9:.2f} GB ({r['real_vocab']:,} tokens) "
            f"| {r['layers']}, {r['synth_total_bytes'] / 1e9:.2f} GB, {100 * r['synth_expert_share']:.1f}%, "
            f"{r['synth_embedding_bytes'] / 1e6:.1f} MB ({r['vocab']:,} tokens) "
            f"| {100 * r['real_slice_expert_share']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
