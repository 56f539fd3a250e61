"""Zipf-skewed routing: deterministic per (token, position, layer), loads follow Zipf(s), the
model's own scores still weight the chosen experts."""

from __future__ import annotations

import numpy as np
import torch

from nodes.model.config import MoEConfig
from nodes.model.moe import Router
from nodes.model.skew import ZipfSkew, apply_zipf


def _loads(s: float, tokens: int = 20000, experts: int = 16, k: int = 2) -> np.ndarray:
    skew = ZipfSkew(s, experts, num_layers=1, seed=3)
    skew.set_tokens(torch.arange(tokens) % 2048, torch.arange(tokens))
    chosen = skew.choose(0, k, tokens)
    assert all(len(set(row.tolist())) == k for row in chosen[:200])  # without replacement
    counts = np.bincount(chosen.flatten().numpy(), minlength=experts)
    return np.sort(counts)[::-1] / counts.sum()


def test_loads_follow_the_skew_and_repeat_exactly():
    flat, mild, steep = _loads(0.0), _loads(0.8), _loads(1.5)
    assert flat.max() / flat.min() < 1.2  # s = 0: uniform
    assert 1.2 < mild[0] / mild[-1] < steep[0] / steep[-1]  # hotter head as s grows
    assert steep[0] > 0.2 and steep[:3].sum() > 0.45  # s = 1.5: a few experts take most slots
    assert np.array_equal(_loads(1.5), steep)  # same keys, same choice


def test_router_weights_are_its_own_scores_at_the_chosen_experts():
    config = MoEConfig.from_hf_dict({"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                     "num_local_experts": 6, "num_experts_per_tok": 2, "vocab_size": 32})
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    skew = ZipfSkew(1.0, 6, 1)
    router.skew = skew
    x = torch.randn(5, 8)
    skew.set_tokens(torch.arange(5), torch.arange(5))
    r = router(x)
    scores = torch.softmax(x @ router.weight.T, -1)
    expected = scores.gather(1, r.experts)
    torch.testing.assert_close(r.weights, expected / expected.sum(-1, keepdim=True))  # Mixtral renormalises
    assert torch.equal(r.experts, skew.choose(0, 2, 5))


def test_apply_zipf_reaches_every_moe_block():
    from tests.nodes.hf_tiny import random_model

    model = random_model("mixtral")
    assert apply_zipf(model, None) is None and model.skew is None
    skew = apply_zipf(model, 1.2)
    assert all(b.gate.skew is skew for b in model.moe_blocks())
    assert [b.gate.skew_layer for b in model.moe_blocks()] == list(range(len(model.moe_blocks())))
