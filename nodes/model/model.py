"""The MoE decoder, nanoGPT-style: embeddings -> N x (norm, attention, norm, MoE or MLP) -> norm -> head.

One forward pass runs a flat batch of new tokens from several sequences (see cache.py):

    input_ids [T] ──embed──► x [T, H] ──► layer 0 .. layer N-1 ──► norm ──► lm_head ──► logits [T, V]

and each MoE layer hands its routed experts to an `ExpertExecutor`, which is how the mesh
moves expert work to remote functions without touching the maths.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .attention import GroupedQueryAttention, MultiHeadLatentAttention
from .cache import Segment, SequenceCache, positions_of
from .config import MoEConfig
from .layers import MLP, RMSNorm
from .moe import ExpertExecutor, LocalExecutor, MoEBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer: int, held: Iterable[int] | None = None) -> None:
        super().__init__()
        attention = MultiHeadLatentAttention if config.attention == "mla" else GroupedQueryAttention
        self.self_attn = attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = config.moe_ordinal(layer)
        self.mlp = MoEBlock(config, moe, held) if moe is not None else MLP(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x, segments, positions, executor: ExpertExecutor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), segments, positions)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, executor) if isinstance(self.mlp, MoEBlock) else self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, config: MoEConfig, experts: Iterable[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        held: dict[int, list[int]] | None = None
        if experts is not None:
            held = {m: [] for m in range(config.num_moe_layers)}
            for layer, e in experts:
                held[layer].append(e)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, None if held is None else held.get(config.moe_ordinal(i), []))
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEModel(nn.Module):
    """Parameter names follow the HF layout (`model.layers.3.mlp.experts.5.up_proj.weight`), so an
    HF state dict loads after only the family's renames (see checkpoint.py).

    experts: the routed (moe_layer, expert) pairs to allocate; None = all (the in-process engine).
    The mesh's main function allocates only its plan's local experts (see `ExpertSet`)."""

    def __init__(self, config: MoEConfig, experts: Iterable[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config, experts)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.skew = None  # nodes/model/skew.py apply_zipf: Zipf-skewed routing instead of the router's

    def new_cache(self) -> SequenceCache:
        return SequenceCache(self.config.num_layers)

    def moe_blocks(self) -> list[MoEBlock]:
        return [self.model.layers[i].mlp for i in self.config.moe_layer_ids]

    def held_experts(self) -> set[tuple[int, int]]:
        """(moe_layer, expert) pairs whose weights this model holds."""
        return {(m, e) for m, block in enumerate(self.moe_blocks()) for e in block.experts.ids()}

    def held_bytes(self) -> int:
        """Bytes of every parameter and buffer this model holds (tied weights once)."""
        tensors = {id(t): t for t in (*self.parameters(), *self.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        segments: list[Segment],
        executor: ExpertExecutor | None = None,
        all_logits: bool = True,
    ) -> torch.Tensor:
        """input_ids [T] (the new tokens of every segment, concatenated) -> logits.

        Returns [T, V] logits, or only each segment's last row [S, V] when all_logits=False, on
        the model's device (input_ids may come from the host: they are moved there).
        Advances every segment's cache by its length.
        """
        executor = executor or LocalExecutor()
        device = self.model.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        positions = positions_of(segments, device)  # [T]
        if self.skew is not None:  # Zipf-skewed routing keys on (token id, position)
            self.skew.set_tokens(input_ids, positions)
        x = self.model.embed_tokens(input_ids)  # [T, H]
        for layer in self.model.layers:
            x = layer(x, segments, positions, executor)
        for seg in segments:
            seg.cache.length += seg.length
        if not all_logits:
            x = x[torch.tensor([s.start + s.length - 1 for s in segments], device=device)]  # [S, H]
        return self.lm_head(self.model.norm(x))
