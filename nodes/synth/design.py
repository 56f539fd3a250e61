"""The synthetic router: structured weights that make a model's own gates route like a real model's.

Random gates route uniformly and unpredictably. Here every tensor is random filler except a few
structured entries that set up a *routing code* in the residual stream (coordinates of `x`):

    x[0]            a constant "bias" direction (B0 in every token's embedding)
    x[1 : 1+D]      the token's code t_v (D = code_dim): part the bundled model's trained
                    embedding of that token (similar tokens route alike), part random per id
    x[1+D : 1+2D]   the context code, written by each layer's *context head*: attention head 0,
                    whose query and key are the constant direction rotated by one low-frequency
                    rotary pair, so its score is A cos(theta (t - s)): a Gaussian window over
                    the last ~`window` tokens; its value reads the token codes and its output
                    writes them, averaged, into the context block
    x[rest]         small filler

Gate of MoE layer m (rows = experts):  logits = gain * (a_m G_m t + c_m G_m ctx + skew s_m)
with G_m [E, D] correlated with G_{m-1} through a random permutation of expert ids, and the
depth curves a_m (token) and c_m (context) of the preset's RoutingProfile. Experts' and MLPs'
down projections add `noise` per routing coordinate, so each layer changes the next one's gate
input a little (cross-layer predictability below 100%), and attention/expert outputs elsewhere
stay small. Everything is derived from (preset, layers, vocab, seed), tensor by tensor.
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import cached_property
from pathlib import Path

import torch

from nodes.model.config import MoEConfig
from nodes.model.layers import Rotary

from .presets import Preset

BUNDLED = Path(__file__).resolve().parents[1] / "bundled"
B0 = 4.0  # the constant direction's value in every embedding
EPS_REST = 0.02  # filler std of the embedding outside the routing code
MAX_CONTEXT = 512  # the window's rotary pair does not wrap around within this many tokens
WEIGHT_NOISE = 0.02  # per-coordinate std that attention/experts write outside the routing code

BALANCE_STEPS = 40

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _silu_rms() -> float:
    """rms of silu(z) * y for z, y ~ N(0, 1): what a SwiGLU with unit pre-activations outputs."""
    z = torch.linspace(-8, 8, 20001)
    density = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(float(((z * torch.sigmoid(z)) ** 2 * density).sum() * (z[1] - z[0])))


SILU_RMS = _silu_rms()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _curve(points: tuple[float, float, float], depth: float) -> float:
    first, mid, last = points
    if depth <= 0.5:
        return first + (mid - first) * 2 * depth
    return mid + (last - mid) * (2 * depth - 1)


class RouterDesign:
    """All tensors of one synthetic checkpoint: `tensor(name, shape)` -> float32, deterministic."""

    def __init__(self, preset: Preset, raw_config: dict, seed: int) -> None:
        self.preset, self.seed = preset, seed
        self.config = MoEConfig.from_hf_dict(raw_config, f"preset {preset.name}")
        self.profile = preset.routing
        c, d = self.config, self.profile.code_dim
        self.code_dim = d
        self.token_block = slice(1, 1 + d)
        self.ctx_block = slice(1 + d, 1 + 2 * d)
        if c.hidden_size < 1 + 2 * d:
            raise ValueError(f"{preset.name}: hidden {c.hidden_size} is too small for a routing code of {d}")
        value_dim = c.v_head_dim if c.attention == "mla" else c.head_dim
        if value_dim < d or (c.attention == "mla" and c.kv_lora_rank < d):
            raise ValueError(f"{preset.name}: the context head needs value width >= code_dim {d}")

    # ---- random streams --------------------------------------------------------------------
    def generator(self, tag: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.preset.name}|{self.seed}|{tag}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def randn(self, tag: str, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator(tag), dtype=torch.float32)

    # ---- the routing code ------------------------------------------------------------------
    @cached_property
    def token_codes(self) -> torch.Tensor:
        """[V, D] unit codes: `semantic` of the bundled model's embedding (projected), the rest random."""
        vocab, d, semantic = self.config.vocab_size, self.code_dim, self.profile.semantic
        random_part = _normalize(self.randn("codes", vocab, d))
        if semantic <= 0:
            return random_part
        from safetensors import safe_open

        with safe_open(BUNDLED / "model.safetensors", "pt") as f:
            trained = f.get_tensor("model.embed_tokens.weight").float()  # [2048, 128]
        trained = trained - trained.mean(0, keepdim=True)
        # whitened principal directions: similar tokens stay close, no direction dominates
        u, _, _ = torch.linalg.svd(trained, full_matrices=False)  # u [2048, 128]
        rotation = torch.linalg.qr(self.randn("projection", u.shape[1], d))[0]  # [128, D] orthonormal columns
        projected = _normalize(u @ rotation)  # [2048, D]
        sem = random_part.clone()
        rows = min(vocab, projected.shape[0])
        sem[:rows] = projected[:rows]
        return _normalize(semantic * sem + (1 - semantic) * random_part)

    @cached_property
    def gates(self) -> list[torch.Tensor]:
        """Per MoE layer [E, D] unit rows, each correlated with the previous layer's (permuted)."""
        c, rho = self.config, self.profile.gate_corr
        out = [_normalize(self.randn("gate0", c.num_experts, self.code_dim))]
        for m in range(1, c.num_moe_layers):
            perm = torch.randperm(c.num_experts, generator=self.generator(f"perm{m}"))
            fresh = _normalize(self.randn(f"gate{m}", c.num_experts, self.code_dim))
            out.append(_normalize(rho * out[-1][perm] + math.sqrt(1 - rho * rho) * fresh))
        return out

    def window_weights(self, length: int) -> torch.Tensor:
        """[length, length] the context head's attention: causal, softmax of A (cos(theta dt) - 1)."""
        _, theta, amplitude = self.window_pair
        dt = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).float()
        scores = amplitude * (torch.cos(theta * dt) - 1)
        return scores.masked_fill(dt < 0, float("-inf")).softmax(-1)

    @cached_property
    def balance(self) -> list[torch.Tensor]:
        """Per MoE layer [E] logit offsets that equalise expert loads on the calibration tokens.

        A load-balancing loss does this in training; here the gate logits of the design (token
        code + windowed context, noise left out) are computed for the shipped calibration
        tokens (stream.calibration_tokens) and each expert's offset is nudged toward the mean
        load (DeepSeek-V3's bias update, BALANCE_STEPS steps). The preset's `skew` is added on top.
        """
        from .stream import calibration_tokens

        c, p, d = self.config, self.profile, self.code_dim
        tokens = calibration_tokens() % c.vocab_size  # [S, L]
        codes = self.token_codes[tokens] * math.sqrt(d)  # [S, L, D]
        context = self.window_weights(tokens.shape[1]) @ codes  # [S, L, D]
        target = tokens[:, ::4].numel() * c.top_k / c.num_experts
        out = []
        for m, layer in enumerate(c.moe_layer_ids):
            written = sum(self.ctx_write(j) for j in range(layer + 1))
            depth = self.depth(m)
            logits = (_curve(p.token_mix, depth) * codes + _curve(p.ctx_mix, depth) * written * context) @ self.gates[m].T
            logits = logits[:, ::4].reshape(-1, c.num_experts)  # every 4th token: [S*L/4, E]
            bias = torch.zeros(c.num_experts)
            for step in range(BALANCE_STEPS):
                chosen = (logits + bias).topk(c.top_k, dim=-1).indices
                load = torch.bincount(chosen.reshape(-1), minlength=c.num_experts).float()
                bias += (0.3 / (1 + step / 10)) * (target - load) / target
            out.append(bias)
        return out

    def depth(self, moe_layer: int) -> float:
        n = self.config.num_moe_layers
        return 0.5 if n == 1 else moe_layer / (n - 1)

    def ctx_write(self, layer: int) -> float:
        first, rest = self.profile.ctx_write
        return first if layer == 0 else rest

    @cached_property
    def rms(self) -> list[float]:
        """Estimated rms of the residual stream at each decoder layer's input (layer-norm scale)."""
        c, d, p = self.config, self.code_dim, self.profile
        h = c.hidden_size
        norm2 = B0 * B0 + d + EPS_REST**2 * (h - 1 - d)
        out = []
        for layer in range(c.num_layers):
            out.append(math.sqrt(norm2 / h))
            norm2 += 0.5 * d * self.ctx_write(layer) ** 2 + 2 * d * p.noise**2 + (h - 1 - 2 * d) * WEIGHT_NOISE**2
        return out

    # ---- the context head --------------------------------------------------------------------
    @cached_property
    def window_pair(self) -> tuple[int, float, float]:
        """(rotary pair index, its frequency, amplitude A of A cos(theta dt)) for the context head."""
        c = self.config
        if c.attention == "mla":
            rotary = Rotary(c.qk_rope_head_dim, c.rope_theta, interleaved=True, scaling=c.rope_scaling)
        else:
            rotary = Rotary(c.head_dim, c.rope_theta)
        limit = math.pi / MAX_CONTEXT
        freqs = rotary.inv_freq.tolist()
        pair = max((i for i, f in enumerate(freqs) if f <= limit), key=lambda i: freqs[i])
        theta = freqs[pair]
        amplitude = 1.0 / (theta * self.profile.window) ** 2
        return pair, theta, amplitude

    def _qk_entry(self, layer: int) -> float:
        """The weight from the constant direction into the context head's query (and key)."""
        c = self.config
        _, _, amplitude = self.window_pair
        if c.attention == "mla":
            scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
            magnitude = 1.0
            if c.rope_scaling is not None:
                scale *= c.rope_scaling.softmax_mscale
                magnitude = c.rope_scaling.attention_factor
        else:
            scale, magnitude = c.head_dim**-0.5, 1.0
        normalized_bias = B0 / self.rms[layer]
        return math.sqrt(amplitude / (scale * magnitude**2)) / normalized_bias

    # ---- tensors -------------------------------------------------------------------------------
    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Our parameter name (model.py's layout) and shape -> float32 tensor."""
        c = self.config
        if name == "model.embed_tokens.weight":
            return self._embedding(shape)
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name == "lm_head.weight":
            return self.randn(name, *shape) / math.sqrt(c.hidden_size)
        match = _LAYER.fullmatch(name)
        if match is None:
            raise ValueError(f"synthetic design has no rule for tensor {name!r}")
        layer, rest = int(match.group(1)), match.group(2)
        if rest.startswith("self_attn."):
            return self._attention(name, layer, rest.removeprefix("self_attn."), shape)
        if rest == "mlp.gate.weight":
            return self._gate(layer, shape)
        if rest == "mlp.shared_expert_gate.weight":
            return self.randn(name, *shape) / math.sqrt(c.hidden_size)
        if rest.endswith(("gate_proj.weight", "up_proj.weight")):
            w = self.randn(name, *shape) / math.sqrt(shape[1])
            w[:, 0] = 0.0  # blind to the constant direction: no common offset in the outputs
            return w
        if rest.endswith("down_proj.weight"):
            return self._down(name, shape)
        raise ValueError(f"synthetic design has no rule for tensor {name!r}")

    def _embedding(self, shape) -> torch.Tensor:
        vocab, hidden = shape
        x = self.randn("embed", vocab, hidden) * EPS_REST  # [V, H]
        x[:, 0] = B0
        x[:, self.token_block] = self.token_codes * math.sqrt(self.code_dim)
        x[:, self.ctx_block] = 0.0
        return x

    def _down(self, name: str, shape) -> torch.Tensor:
        """[H, I]: the routing code's rows get `noise` per coordinate, the rest WEIGHT_NOISE."""
        hidden, inner = shape
        w = self.randn(name, hidden, inner) / (math.sqrt(inner) * SILU_RMS)
        w[0] = 0.0  # never disturb the constant direction
        w[1:1 + 2 * self.code_dim] *= self.profile.noise
        w[1 + 2 * self.code_dim:] *= WEIGHT_NOISE
        return w

    def _gate(self, layer: int, shape) -> torch.Tensor:
        """[E, H] router weight of decoder layer `layer`."""
        m = self.config.moe_ordinal(layer)
        p, rms = self.profile, self.rms[layer]
        depth = self.depth(m)
        gate = self.gates[m]  # [E, D]
        w = self.randn(f"gatefill{layer}", *shape) * (1e-3 / math.sqrt(shape[1]))
        gain = p.gate_gain * rms  # token logits G t sqrt(D) ~ N(0, 1) before the mix weights
        w[:, self.token_block] = _curve(p.token_mix, depth) * gain * gate
        w[:, self.ctx_block] = _curve(p.ctx_mix, depth) * gain * gate
        offset = self.balance[m] + p.skew * self.randn(f"skew{layer}", shape[0])  # [E] logit units
        w[:, 0] = p.gate_gain * offset * rms / B0
        return w

    def _attention(self, name: str, layer: int, part: str, shape) -> torch.Tensor:
        c, d = self.config, self.code_dim
        hidden = c.hidden_size
        fan_in = shape[-1] if len(shape) == 2 else hidden
        if part.endswith(".bias"):
            w = self.randn(name, *shape) * 0.02
        elif part == "o_proj.weight":
            w = self.randn(name, *shape) * (WEIGHT_NOISE / math.sqrt(fan_in))
        else:
            w = self.randn(name, *shape) / math.sqrt(fan_in)
            if part in ("v_proj.weight", "kv_a_proj_with_mqa.weight"):
                w[:, 0] = 0.0  # values blind to the constant direction (no common offset)
        write = self.ctx_write(layer)
        if write == 0:
            return w
        pair, _, _ = self.window_pair
        entry = self._qk_entry(layer)
        if c.attention == "gqa":
            hd = c.head_dim
            if part in ("q_proj.weight", "k_proj.weight"):
                w[:hd] = 0.0
                w[pair, 0] = entry  # rotary pair (pair, pair + head_dim/2) in the halves layout
            elif part in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
                w[:hd] = 0.0
            elif part == "v_proj.weight":
                w[:hd] = 0.0
                w[torch.arange(d), torch.arange(1, 1 + d)] = 1.0
            elif part == "o_proj.weight":
                w[:, :hd] = 0.0
                w[torch.arange(1 + d, 1 + 2 * d), torch.arange(d)] = write * self.rms[layer]
            return w
        # MLA: head 0's rope query and the shared rope key carry the window; its value the codes
        nope, rope, vdim, rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        if part == "q_proj.weight":
            w[: nope + rope] = 0.0
            w[nope + 2 * pair, 0] = entry
        elif part == "kv_a_proj_with_mqa.weight":
            w[:rank] *= WEIGHT_NOISE
            w[:d] = 0.0
            w[torch.arange(d), torch.arange(1, 1 + d)] = 1.0
            w[rank:] = 0.0
            w[rank + 2 * pair, 0] = entry
        elif part == "kv_b_proj.weight":
            w[: nope + vdim] = 0.0
            w[nope + torch.arange(d), torch.arange(d)] = 1.0
        elif part == "o_proj.weight":
            w[:, :vdim] = 0.0
            # the value reads the latent after kv_a_layernorm: sqrt(rank) t_v; write sqrt(D) t_v
            w[torch.arange(1 + d, 1 + 2 * d), torch.arange(d)] = write * math.sqrt(d / rank)
        return w
