"""YaRN rope scaling (DeepSeek-V2-Lite's) against HF transformers on a tiny random DeepSeek-V2."""

from __future__ import annotations

import json

import pytest
import torch

from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.config import MoEConfig, UnsupportedModel
from nodes.model.engine import Engine, SamplingParams
from tests.nodes.hf_tiny import COMMON, TINY

pytest.importorskip("transformers")

ATOL = 1e-4
# DeepSeek-V2-Lite's rope_scaling, with the original context shrunk so that short prompts
# cross the ramp (the real one is 4096 tokens).
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
PROMPTS = [list(range(3, 43)), [5, 17, 3, 88, 41, 9], [60, 61, 62, 63, 64, 65, 66, 67, 68, 70, 12]]


def make_yarn_tiny(path, seed: int = 0, rope=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {**COMMON, **TINY["deepseek_v2"], "qk_rope_head_dim": 16, "head_dim": 16,
              "max_position_embeddings": 1280, "rope_scaling": dict(rope or YARN)}
    config = AutoConfig.for_model("deepseek_v2", **kwargs)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "gate" in name else 0.15))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("yarn")
    hf = make_yarn_tiny(path)
    return hf, Checkpoint(path).load_model(), path


def test_config_parses_yarn(pair):
    hf, ours, path = pair
    scaling = ours.config.rope_scaling
    assert scaling is not None and scaling.type == "yarn" and scaling.factor == 40
    assert scaling.original_max_position_embeddings == 32
    assert scaling.softmax_mscale == pytest.approx((0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    attn = ours.model.layers[0].self_attn
    rotary = hf.model.rotary_emb
    torch.testing.assert_close(attn.rotary.inv_freq, rotary.inv_freq, atol=1e-7, rtol=1e-6)
    assert attn.rotary.magnitude == pytest.approx(rotary.attention_scaling)
    assert attn.scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


def test_prefill_and_decode_logits_match_hf(pair):
    hf, ours, _ = pair
    for ids in PROMPTS:
        theirs = hf(torch.tensor([ids]), use_cache=True)
        cache = ours.new_cache()
        logits = ours(torch.tensor(ids), [Segment(0, len(ids), cache)])
        torch.testing.assert_close(logits, theirs.logits[0], atol=ATOL, rtol=0)
        past, nxt = theirs.past_key_values, int(theirs.logits[0, -1].argmax())
        for _ in range(4):
            theirs = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            step = ours(torch.tensor([nxt]), [Segment(0, 1, cache)])
            torch.testing.assert_close(step, theirs.logits[0], atol=ATOL, rtol=0)
            past, nxt = theirs.past_key_values, int(step[-1].argmax())


def test_greedy_generation_is_token_identical(pair):
    hf, ours, _ = pair
    new = 12
    got = Engine(ours).complete(PROMPTS, SamplingParams(max_new_tokens=new, stop_at_eos=False))
    for ids, tokens in zip(PROMPTS, got, strict=True):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
        assert tokens == ref[0, len(ids):].tolist()


def _raw(**rope) -> dict:
    raw = {"model_type": "deepseek_v2", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_experts_per_tok": 2, "n_routed_experts": 8, "kv_lora_rank": 16,
           "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "moe_intermediate_size": 24,
           "max_position_embeddings": 1024}
    if rope:
        raw["rope_scaling"] = rope
    return raw


def test_other_rope_types_are_still_refused():
    for kind in ("linear", "dynamic", "longrope", "llama3"):
        with pytest.raises(UnsupportedModel, match=kind):
            MoEConfig.from_hf_dict(_raw(type=kind, factor=2.0))
    mixtral = {"model_type": "mixtral", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
               "intermediate_size": 24, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64}}
    with pytest.raises(UnsupportedModel, match="deepseek"):
        MoEConfig.from_hf_dict(mixtral)
    assert MoEConfig.from_hf_dict(_raw()).rope_scaling is None


def test_yarn_factor_defaults_to_context_ratio():
    config = MoEConfig.from_hf_dict(_raw(type="yarn", original_max_position_embeddings=256))
    assert config.rope_scaling.factor == 4.0
    assert json.dumps(str(config.rope_scaling))  # printable
