"""Attention: grouped-query attention (Mixtral, Qwen, OLMoE) and multi-head latent attention
(DeepSeek-V2/V3). Both take the flat batch and run each sequence against its own cache."""

from __future__ import annotations

import torch
from torch import nn

from .cache import Segment, causal_mask
from .config import MoEConfig
from .layers import RMSNorm, Rotary


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """q [n, heads, d], k [past+n, kv_heads, d], v [past+n, kv_heads, dv] -> [n, heads, dv].

    heads = kv_heads x groups (grouped-query attention): query head h reads kv head
    h // groups, as HF's repeat_kv, without materialising the repeated keys and values.
    """
    n, heads, _ = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    qg = q.view(n, kv_heads, groups, q.shape[2])
    scores = torch.einsum("qcgd,kcd->cgqk", qg, k) * scale  # [kv_heads, groups, n, past+n]
    if n > 1:  # one new token sees every cached key: no mask
        scores = scores + causal_mask(past, n, scores.dtype, scores.device)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("cgqk,kcd->qcgd", probs, v).reshape(n, heads, v.shape[2])


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: MoEConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "full":  # OLMoE: one norm over all heads, before the reshape
            self.q_norm = RMSNorm(self.heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_heads * self.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "head":  # Qwen3: one norm per head
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv
        self.rotary = Rotary(self.head_dim, config.rope_theta)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, segments: list[Segment], positions: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, heads*d], [T, kv*d], [T, kv*d]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.angles(positions)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)

        out = []
        for seg in segments:
            rows = slice(seg.start, seg.start + seg.length)
            past = seg.cache.length
            keys, values = seg.cache.append(self.layer, k[rows], v[rows])  # [past+n, kv, d]
            out.append(attend(q[rows], keys, values, past, self.scale))
        return self.o_proj(torch.cat(out).reshape(tokens, self.heads * self.head_dim))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek's MLA: keys and values are expanded from a small cached latent per token."""

    def __init__(self, config: MoEConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        hidden, self.heads = config.hidden_size, config.num_heads
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_dim = self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, hidden, bias=False)
        self.rotary = Rotary(self.rope, config.rope_theta, interleaved=True, scaling=config.rope_scaling)
        self.scale = qk_dim**-0.5
        if config.rope_scaling is not None:  # DeepSeek's YaRN also sharpens the softmax (mscale_all_dim)
            self.scale *= config.rope_scaling.softmax_mscale
        self.q_lora = config.q_lora_rank is not None

    def forward(self, x: torch.Tensor, segments: list[Segment], positions: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(tokens, self.heads, self.nope + self.rope)
        q_nope, q_rope = q.split((self.nope, self.rope), dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope), dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, kv_lora_rank]
        cos, sin = self.rotary.angles(positions)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        k_rope = self.rotary.apply(k_rope[:, None, :], cos, sin)[:, 0, :]  # [T, rope]
        q = torch.cat((q_nope, q_rope), dim=-1)

        out = []
        for seg in segments:
            rows = slice(seg.start, seg.start + seg.length)
            past = seg.cache.length
            latents, rope_keys = seg.cache.append(self.layer, latent[rows], k_rope[rows])
            kv = self.kv_b_proj(latents).view(-1, self.heads, self.nope + self.v_dim)
            k_nope, values = kv.split((self.nope, self.v_dim), dim=-1)
            keys = torch.cat((k_nope, rope_keys[:, None, :].expand(-1, self.heads, -1)), dim=-1)
            out.append(attend(q[rows], keys, values, past, self.scale))
        return self.o_proj(torch.cat(out).reshape(tokens, self.heads * self.v_dim))
