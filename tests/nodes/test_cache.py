"""The KV cache grows in place (preallocated blocks, doubling) and reads back exactly what a
concatenation of every step's keys and values would."""

from __future__ import annotations

import torch

from nodes.model.attention import attend
from nodes.model.cache import SequenceCache, causal_mask


def test_append_in_place_equals_concatenation_and_counts_its_blocks():
    torch.manual_seed(0)
    cache = SequenceCache(num_layers=2)
    steps = [torch.randn(n, 2, 4) for n in (5, 1, 1, 70, 1)]  # a prefill, decodes, a long chunk
    for layer in range(2):
        seen = []
        for k in steps:
            seen.append(k)
            keys, values = cache.append(layer, k, -k)
            assert torch.equal(keys, torch.cat(seen)) and torch.equal(values, -torch.cat(seen))
    total = sum(k.shape[0] for k in steps)
    capacity = cache._blocks[0][0].shape[0]
    assert capacity >= total and capacity < 2 * max(total, SequenceCache.MIN_CAPACITY)
    assert cache.nbytes() == 2 * 2 * capacity * 2 * 4 * 4  # layers x (k, v) x rows x heads x dim x float32


def test_grouped_attention_equals_repeated_keys_and_values():
    torch.manual_seed(1)
    heads, kv_heads, d, past, n = 8, 2, 16, 7, 3
    q = torch.randn(n, heads, d)
    k, v = torch.randn(past + n, kv_heads, d), torch.randn(past + n, kv_heads, d)
    groups = heads // kv_heads
    kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # HF's repeat_kv
    scores = torch.einsum("qhd,khd->hqk", q, kr) * d**-0.5 + causal_mask(past, n, torch.float32)
    expected = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vr)
    torch.testing.assert_close(attend(q, k, v, past, d**-0.5), expected)
    # decode (one new token, no mask): the same as the first query of the masked prefill above
    one = attend(q[:1], k[: past + 1], v[: past + 1], past, d**-0.5)
    torch.testing.assert_close(one, expected[:1])
