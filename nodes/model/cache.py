"""Per-sequence KV cache and the ragged batch of sequences one forward pass works on.

The model runs a *flat* batch: the new tokens of several sequences concatenated into one
``[tokens, hidden]`` tensor (as vLLM does). Attention runs per sequence against that
sequence's own cache; everything else (norms, MLPs, the MoE layers that cross the network)
runs on all tokens at once, which is what lets many requests share one scatter-gather round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceCache:
    """Keys and values of one sequence, per decoder layer.

    GQA layers store keys/values ``[length, kv_heads, head_dim]``; MLA layers store the
    normalised KV latent ``[length, kv_lora_rank]`` as keys and the rotated shared rope key
    ``[length, qk_rope_head_dim]`` as values (DeepSeek's compressed cache).
    """

    num_layers: int
    length: int = 0
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v for `layer`; return everything cached for it (old + new)."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None:
            k, v = torch.cat((old_k, k)), torch.cat((old_v, v))
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


@dataclass(frozen=True)
class Segment:
    """`length` new tokens of one sequence, at rows [start, start + length) of the flat batch."""

    start: int
    length: int
    cache: SequenceCache


def make_segments(lengths: list[int], caches: list[SequenceCache]) -> list[Segment]:
    segments, start = [], 0
    for n, cache in zip(lengths, caches, strict=True):
        segments.append(Segment(start, n, cache))
        start += n
    return segments


def positions_of(segments: list[Segment], device: torch.device | str | None = None) -> torch.Tensor:
    """[tokens] absolute positions of every new token of the flat batch, on `device`."""
    return torch.cat([torch.arange(s.cache.length, s.cache.length + s.length, device=device) for s in segments])


def causal_mask(past: int, new: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """[new, past + new] additive mask on `device`: query i sees keys 0 .. past + i."""
    keys = torch.arange(past + new, device=device)[None, :]
    queries = torch.arange(new, device=device)[:, None] + past
    return torch.zeros(new, past + new, dtype=dtype, device=device).masked_fill(keys > queries, float("-inf"))
