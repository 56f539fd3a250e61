"""Synthetic checkpoints: real per-layer shapes, the HF loader, determinism, the cache, the router."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nodes.model.cache import Segment
from nodes.model.checkpoint import Checkpoint
from nodes.model.config import MoEConfig
from nodes.synth import PRESETS, SynthError, ensure_checkpoint, get_preset, write_checkpoint
from nodes.synth.sizes import compare
from nodes.synth.writer import MANIFEST, tensor_plan

FULL = ("qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b")


def test_presets_have_the_real_per_layer_shapes():
    qwen = MoEConfig.from_hf_dict(get_preset("qwen1.5-moe-a2.7b").hf_config(4))
    assert (qwen.family, qwen.hidden_size, qwen.num_experts, qwen.expert_intermediate_size, qwen.top_k) == \
        ("qwen2_moe", 2048, 60, 1408, 4)
    assert (qwen.shared_intermediate_size, qwen.shared_expert_gate, qwen.num_heads, qwen.qkv_bias) == \
        (5632, True, 16, True)
    ds = MoEConfig.from_hf_dict(get_preset("deepseek-v2-lite").hf_config(4))
    assert (ds.family, ds.hidden_size, ds.num_experts, ds.expert_intermediate_size, ds.top_k) == \
        ("deepseek_v2", 2048, 64, 1408, 6)
    assert (ds.shared_intermediate_size, ds.kv_lora_rank, ds.q_lora_rank, ds.qk_nope_head_dim,
            ds.qk_rope_head_dim, ds.v_head_dim, ds.num_heads) == (2816, 512, None, 128, 64, 128, 16)
    assert ds.moe_layer_ids == (1, 2, 3) and ds.dense_intermediate_size == 10944
    assert ds.rope_scaling is not None and ds.rope_scaling.factor == 40
    assert ds.rope_scaling.original_max_position_embeddings == 4096
    mx = MoEConfig.from_hf_dict(get_preset("mixtral-8x7b").hf_config(2))
    assert (mx.family, mx.hidden_size, mx.num_experts, mx.expert_intermediate_size, mx.top_k,
            mx.num_heads, mx.num_kv_heads) == ("mixtral", 4096, 8, 14336, 2, 32, 8)
    with pytest.raises(ValueError, match="no MoE layer"):
        get_preset("deepseek-v2-lite").hf_config(1)


@pytest.mark.parametrize("name", FULL)
def test_expert_bytes_per_layer_match_the_real_model(name):
    report = compare(PRESETS[name])
    assert report["per_layer_ratio_error"] < 0.10
    assert report["synth_total_bytes"] < 6.5e9  # fits this machine's 24 GB, loaded in float32
    assert report["real_expert_share"] > 0.85


@pytest.mark.parametrize("name", [f"{n}-small" for n in FULL])
def test_small_variant_loads_through_checkpoint_with_the_plan_shapes(name, tmp_path):
    preset = get_preset(name)
    layers = 3
    path = write_checkpoint(name, layers, tmp_path / "ckpt", progress=False)
    assert json.loads((path / "config.json").read_text()) == json.loads(json.dumps(preset.hf_config(layers)))
    ckpt = Checkpoint(path)
    model = ckpt.load_model()
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert shapes == dict(tensor_plan(ckpt.config))
    assert (path / "tokenizer.json").exists()
    experts = ckpt.load_experts([(0, 1)])
    assert experts[(0, 1)].up_proj.weight.shape == (ckpt.config.expert_intermediate_size, ckpt.config.hidden_size)
    ids = torch.arange(1, 40)
    logits = model(ids, [Segment(0, len(ids), model.new_cache())])
    assert logits.shape == (39, ckpt.config.vocab_size) and torch.isfinite(logits).all()


def test_bytes_are_a_function_of_the_seed(tmp_path):
    a = write_checkpoint("qwen1.5-moe-a2.7b-small", 2, tmp_path / "a", seed=5, progress=False)
    b = write_checkpoint("qwen1.5-moe-a2.7b-small", 2, tmp_path / "b", seed=5, progress=False)
    c = write_checkpoint("qwen1.5-moe-a2.7b-small", 2, tmp_path / "c", seed=6, progress=False)
    digest = lambda p: json.loads((p / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_second_call_is_a_cache_hit(tmp_path):
    first = ensure_checkpoint("mixtral-8x7b-small", 2, seed=0, cache_dir=tmp_path, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_checkpoint("mixtral-8x7b-small", 2, seed=0, cache_dir=tmp_path, progress=False)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_checkpoint("mixtral-8x7b-small", 2, seed=1, cache_dir=tmp_path, progress=False)
    assert other != first
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(SynthError, match="remove it"):  # a directory holding something else
        write_checkpoint("mixtral-8x7b-small", 3, first, progress=False)


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
    single = write_checkpoint("deepseek-v2-lite-small", 2, tmp_path / "one", progress=False)
    sharded = write_checkpoint("deepseek-v2-lite-small", 2, tmp_path / "many", max_shard_bytes=1_000_000,
                               progress=False)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    a, b = Checkpoint(single).load_model(), Checkpoint(sharded).load_model()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_cli_writes_and_reuses(tmp_path, capsys):
    from mesh.cli import main

    assert main(["synth", "--preset", "mixtral-8x7b-small", "--layers", "2", "--out", str(tmp_path / "m"),
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert main(["synth", "--preset", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_small_router_is_skewed_local_and_predictable_unlike_a_uniform_one(tmp_path):
    from nodes.model.tokenizer import Tokenizer
    from nodes.synth.routing_stats import (
        activation_rates,
        cache_hit_rates,
        consecutive,
        cross_layer,
        record,
        uniform_trace,
    )
    from nodes.synth.stream import build_stream

    try:
        path = ensure_checkpoint("deepseek-v2-lite-small", 4, seed=0, cache_dir=tmp_path, progress=False)
        sequences = build_stream(Tokenizer.from_dir(path), 2048)
    except FileNotFoundError as exc:
        pytest.skip(f"needs ../shared/data/prompts: {exc}")
    synth = record(Checkpoint(path).load_model(), sequences, "synth", progress=False)
    uniform = uniform_trace(synth)
    assert synth.tokens == uniform.tokens >= 2048 and synth.layers == 3

    def stats(trace):
        rates = activation_rates(trace)
        return {"cv": rates.std() / rates.mean(),
                "overlap": np.mean([consecutive(trace, m)[1] for m in range(trace.layers)]),
                "sch16": np.mean([cache_hit_rates(trace, m, (16,), baselines=False)["SCH16"]
                                  for m in range(trace.layers)]),
                "cross": np.mean([cross_layer(trace, m, 1)[0] for m in range(trace.layers - 1)])}

    ours, theirs = stats(synth), stats(uniform)
    assert ours["cv"] > 2 * theirs["cv"]  # skewed
    assert ours["sch16"] > theirs["sch16"] + 5  # locally consistent
    assert ours["overlap"] > theirs["overlap"] + 5
    assert ours["cross"] > 60 > 3 * theirs["cross"]  # predictable from the layer before
