"""Checkpoint loading: only the chosen experts are read; errors name file, tensor and expectation."""

from __future__ import annotations

import json

import pytest
import torch

from nodes.model.checkpoint import Checkpoint, CheckpointError, expert_prefix
from nodes.model.config import MoEConfig, UnsupportedModel
from nodes.model.engine import Engine, SamplingParams
from nodes.model.tokenizer import StreamDecoder, Tokenizer
from tests.nodes.hf_tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    make_tiny("mixtral", path, seed=5)
    return path


def test_load_experts_reads_only_those_tensors(tiny):
    ckpt = Checkpoint(tiny)
    chosen = [(0, 3), (1, 5)]
    experts = ckpt.load_experts(chosen)
    wanted = {expert_prefix(ckpt.config, layer, e) + f"{p}.weight"
              for layer, e in chosen for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(ckpt.tensors_read) == wanted
    assert len(ckpt.tensors_read) == 6
    assert ckpt.bytes_read == sum(p.numel() * 4 for mlp in experts.values() for p in mlp.parameters())
    # and they compute what the whole model's experts compute
    full = Checkpoint(tiny).load_model()
    x = torch.randn(4, ckpt.config.hidden_size)
    block = full.moe_blocks()[1]
    torch.testing.assert_close(experts[(1, 5)](x), block.experts[5](x))


def test_unknown_expert_is_a_clear_error(tiny):
    with pytest.raises(CheckpointError, match=r"unknown expert \(2, 0\).*2 MoE layers x 8 experts"):
        Checkpoint(tiny).load_experts([(2, 0)])


def test_missing_tensor_names_the_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight' is missing"):
        Checkpoint(tmp_path).load_model()


def test_shape_mismatch_names_file_tensor_and_expected(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
                                              r"has shape \(3, 3\), expected \(32, 32\)"):
        Checkpoint(tmp_path).load_model()


def test_unsupported_family_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModel, match="model_type 'llama' is not supported; supported families: mixtral"):
        MoEConfig.from_file(tmp_path)


def test_bundled_model_generates_text():
    from mesh.config import ModelConfig

    path = ModelConfig().resolved_path()
    model = Checkpoint(path).load_model()
    tokenizer = Tokenizer.from_dir(path)
    assert model.config.num_moe_layers >= 4 and model.config.num_experts >= 8 and model.config.top_k == 2
    decoder = StreamDecoder(tokenizer)
    tokens = Engine(model).complete([tokenizer.encode("def add(a, b):")], SamplingParams(max_new_tokens=12))[0]
    text = "".join(decoder.push(t) for t in tokens)
    assert len(tokens) >= 1 and text.strip()


def test_sampling_is_seeded_and_batched_equals_single():
    from mesh.config import ModelConfig

    path = ModelConfig().resolved_path()
    model = Checkpoint(path).load_model()
    tokenizer = Tokenizer.from_dir(path)
    prompts = [tokenizer.encode(p) for p in ("Question: 2 + 2?", "import os", "The licence")]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7, stop_at_eos=False)
    batched = Engine(model).complete(prompts, params)
    single = [Engine(model).complete([p], params)[0] for p in prompts]
    assert batched == single
    greedy = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    assert Engine(model).complete(prompts, greedy) == [Engine(model).complete([p], greedy)[0] for p in prompts]
