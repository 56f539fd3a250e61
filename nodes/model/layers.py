"""Small building blocks shared by every family: RMSNorm, rotary embeddings, the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary:
    """Rotary position embedding for `dim` channels.

    `interleaved=False` rotates the two halves of the vector (Llama/Mixtral/Qwen/OLMoE);
    `interleaved=True` rotates adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek-V2/V3).
    `scaling` (YaRN) changes the frequencies and multiplies cos/sin by its attention factor.
    """

    def __init__(self, dim: int, theta: float, interleaved: bool = False,
                 scaling: RopeScaling | None = None) -> None:
        self.dim = dim
        self.interleaved = interleaved
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [dim/2]
        self.magnitude = 1.0
        if scaling is not None:
            self.inv_freq = yarn_inv_freq(self.inv_freq, dim, theta, scaling)
            self.magnitude = scaling.attention_factor

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim/2] (float32), times the YaRN attention factor if any."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        if self.magnitude == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.magnitude, freqs.sin() * self.magnitude

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim], cos/sin [T, dim/2] -> rotated x [T, heads, dim]."""
        dtype = x.dtype
        x = x.float()
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, dim/2]
        if self.interleaved:
            even, odd = x[..., 0::2], x[..., 1::2]
            out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
            return out.flatten(-2).to(dtype)
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(dtype)


def yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """inv_freq [dim/2] -> YaRN's blend: original frequencies for dimensions that rotate more than
    `beta_fast` times over the original context, frequencies / factor below `beta_slow`, a linear
    ramp between (as HF `_compute_yarn_parameters` and DeepSeek's `DeepseekV2YarnRotaryEmbedding`)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim/2]
    extrapolation = 1 - ramp  # 1: keep the original frequency
    return (inv_freq / scaling.factor) * (1 - extrapolation) + inv_freq * extrapolation


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Experts, shared experts and dense layers."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
