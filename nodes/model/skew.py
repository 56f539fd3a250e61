"""Zipf-skewed routing: the load pattern MoEless evaluates under (skew s = 0.5 .. 1.5), applied
to any model in place of its own router's choice.

    apply_zipf(model, s)      # every MoE block's gate picks its top-k from a Zipf(s) popularity

Per MoE layer a fixed random permutation (seeded) ranks the experts; expert of rank r (1-based)
is chosen with probability proportional to r^-s. Each token's top-k experts are drawn without
replacement from that distribution by the Gumbel-top-k trick, with uniforms that are a
deterministic hash of (token id, position, layer, expert): the same prompt routes the same way
in the mesh's coordinator, the in-process engine and every run, so greedy tokens stay comparable.
The combine weights are the router's own scores at the chosen experts (renormalised where the
family normalises top-k), so the model still computes with its real experts; only *which*
experts run follows the skew. s = 0 gives uniform routing.
"""

from __future__ import annotations

import torch

MODULUS = 2_147_483_647  # token keys are taken modulo 2^31 - 1
MASK = 0xFFFFFFFF


class ZipfSkew:
    def __init__(self, s: float, num_experts: int, num_layers: int, seed: int = 0) -> None:
        if s < 0:
            raise ValueError(f"Zipf skew must be >= 0, got {s}")
        self.s, self.num_experts = float(s), num_experts
        g = torch.Generator().manual_seed(seed)
        by_rank = -self.s * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
        # [layers, E] log-popularity of each expert (expert e has rank rank[layer][e])
        self.log_p = torch.stack([by_rank[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)])
        self.keys: torch.Tensor | None = None  # [T] int64 per-token keys of the current forward pass

    def set_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """The flat batch's token ids and absolute positions [T] (MoEModel.forward sets them)."""
        self.keys = (input_ids.long().cpu() * 1_000_003 + positions.long().cpu()) % MODULUS

    def choose(self, layer: int, k: int, tokens: int) -> torch.Tensor:
        """[tokens, k] int64 expert ids for MoE layer `layer`."""
        if self.keys is None or len(self.keys) != tokens:
            raise RuntimeError("ZipfSkew.choose before set_tokens for this batch")
        experts = torch.arange(self.num_experts, dtype=torch.long)
        x = (self.keys[:, None] * 1_000_003 + (layer * self.num_experts + experts)[None, :] * 2_654_435_761) & MASK
        for _ in range(2):  # a 32-bit integer hash (every product stays under 2^63)
            x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK
        x = x ^ (x >> 16)
        u = (x.double() + 0.5) / (MASK + 1)  # (0, 1)
        gumbel = -torch.log(-torch.log(u))
        return (self.log_p[layer][None, :] + gumbel).topk(k, dim=-1).indices


def apply_zipf(model, s: float, seed: int = 0) -> ZipfSkew | None:
    """Route every MoE block of `model` (an MoEModel) by Zipf(s); s = 0... is still Zipf (uniform).
    Returns the skew (None and no change when s is None)."""
    if s is None:
        return None
    blocks = model.moe_blocks()
    skew = ZipfSkew(s, model.config.num_experts, len(blocks), seed)
    model.skew = skew
    for layer, block in enumerate(blocks):
        block.gate.skew, block.gate.skew_layer = skew, layer
    return skew
