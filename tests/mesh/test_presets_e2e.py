"""The mesh on the realistic presets' structure (small-width variants of Qwen1.5-MoE, DeepSeek-V2-Lite
with MLA, YaRN, a dense first layer and shared experts, and Mixtral): greedy tokens identical to
the in-process engine with half of every layer's experts remote and half local, so both paths,
the split and the combine run on each family (real processes, real safetensors)."""

from __future__ import annotations

import asyncio

import pytest

from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from nodes.synth import ensure_checkpoint
from tests.mesh.conftest import PROMPTS, dump, running_mesh
from tests.mesh.test_mesh_e2e import generate_all, status

NEW_TOKENS = 8


@pytest.mark.parametrize("preset, layers", [
    ("qwen1.5-moe-a2.7b-small", 2),
    ("deepseek-v2-lite-small", 3),  # layer 0 is dense, as in the real model
    ("mixtral-8x7b-small", 2),
])
def test_tokens_equal_in_process_on_each_preset(preset, layers, tmp_path_factory, tmp_path):
    path = ensure_checkpoint(preset, layers, seed=0, cache_dir=tmp_path_factory.mktemp("synth"), progress=False)
    config = Checkpoint(path).config
    prompts = PROMPTS[:4]
    expected = Engine(Checkpoint(path).load_model()).complete(
        prompts, SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False))
    half = config.num_experts // 2
    remote = [[layer, e] for layer in range(config.num_moe_layers) for e in range(half, config.num_experts)]
    with running_mesh(path, tmp_path, **{"policy.name": "static-split", "policy.remote": remote}) as mesh:
        got = asyncio.run(generate_all(mesh.endpoints["client"], prompts, NEW_TOKENS))
        assert [t for t, _ in got] == expected, dump(mesh)
        st = asyncio.run(status(mesh.endpoints["client"]))
        assert st["data_plane"]["replies"] > 0 and st["data_plane"]["fallbacks"] == 0, st["data_plane"]
        assert st["main"]["experts"] == config.num_moe_layers * half  # the local half only
