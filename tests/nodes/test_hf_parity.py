"""Rung 1 of the correctness ladder: our model == HF transformers, for every family."""

from __future__ import annotations

import pytest
import torch

from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from tests.nodes.hf_tiny import TINY, make_tiny

pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 88, 41, 9], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 70, 12]]
ATOL = 1e-4


def our_prefill(model, ids):
    cache = model.new_cache()
    logits = model(torch.tensor(ids), [Segment(0, len(ids), cache)])
    return logits, cache


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, path)
    ours = Checkpoint(path).load_model()
    return request.param, hf, ours


def test_prefill_and_decode_logits_match(pair):
    family, hf, ours = pair
    for ids in PROMPTS:
        theirs = hf(torch.tensor([ids]), use_cache=True)
        logits, cache = our_prefill(ours, ids)
        torch.testing.assert_close(logits, theirs.logits[0], atol=ATOL, rtol=0, msg=f"{family} prefill")
        past, nxt = theirs.past_key_values, int(theirs.logits[0, -1].argmax())
        for _ in range(4):  # decode steps, each against the cache
            theirs = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            step = ours(torch.tensor([nxt]), [Segment(0, 1, cache)])
            torch.testing.assert_close(step, theirs.logits[0], atol=ATOL, rtol=0, msg=f"{family} decode")
            past, nxt = theirs.past_key_values, int(step[-1].argmax())


def test_greedy_generation_is_token_identical(pair):
    family, hf, ours = pair
    new = 12
    engine = Engine(ours)
    got = engine.complete(PROMPTS, SamplingParams(max_new_tokens=new, stop_at_eos=False))  # batched
    for ids, tokens in zip(PROMPTS, got, strict=True):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
        assert tokens == ref[0, len(ids):].tolist(), family


def test_staged_moe_equals_reference_loop(pair):
    _, _, ours = pair
    torch.manual_seed(1)
    x = torch.randn(13, ours.config.hidden_size)
    from nodes.model.moe import LocalExecutor

    for block in ours.moe_blocks():
        torch.testing.assert_close(block(x, LocalExecutor()), block.reference_forward(x), atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    hf = make_tiny("qwen2_moe", tmp_path, seed=3, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = Checkpoint(tmp_path).load_model()
    ids = PROMPTS[0]
    logits, _ = our_prefill(ours, ids)
    torch.testing.assert_close(logits, hf(torch.tensor([ids])).logits[0], atol=ATOL, rtol=0)
