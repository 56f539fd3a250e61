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

    Each layer's tensors are preallocated blocks that grow by doubling (at least
    `MIN_CAPACITY` rows): a decode step writes its one row in place instead of concatenating
    the whole cache again (a copy of O(length) per layer per step). `keys[layer]` /
    `values[layer]` are the filled views ``[:filled]``; `nbytes()` counts the blocks, i.e.
    what the process holds.
    """

    MIN_CAPACITY = 64

    num_layers: int
    length: int = 0
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    _blocks: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
        if not self._blocks:
            self._blocks = [None] * self.num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [n, ...] for `layer`; return everything cached for it (old + new)
        as views [filled + n, ...] of the layer's blocks (valid until the next append)."""
        old = self.keys[layer]
        filled = 0 if old is None else old.shape[0]
        need = filled + k.shape[0]
        block = self._blocks[layer]
        if block is None or block[0].shape[0] < need:
            capacity = max(self.MIN_CAPACITY, need, 2 * (0 if block is None else block[0].shape[0]))
            grown = (k.new_empty((capacity, *k.shape[1:])), v.new_empty((capacity, *v.shape[1:])))
            if filled:
                grown[0][:filled].copy_(block[0][:filled])
                grown[1][:filled].copy_(block[1][:filled])
            block = self._blocks[layer] = grown
        block[0][filled:need].copy_(k)
        block[1][filled:need].copy_(v)
        self.keys[layer], self.values[layer] = block[0][:need], block[1][:need]
        return self.keys[layer], self.values[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._blocks if b is not None for t in b)


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
    """[new, past + new] additive mask on `device`: query i sees keys 0 .. past + i.
    (A single new token sees every key: callers skip the mask then.)"""
    keys = torch.arange(past + new, device=device)[None, :]
    queries = torch.arange(new, device=device)[:, None] + past
    return torch.zeros(new, past + new, dtype=dtype, device=device).masked_fill(keys > queries, float("-inf"))
