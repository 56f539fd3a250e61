"""Rung 2 of the correctness ladder with the main model on CUDA: a real mesh whose coordinator
runs on the GPU (remote experts' activations through mesh/staging.py) gives the CPU in-process
engine's greedy tokens; a node of kind "gpu" runs its functions on its GPU.

Marked `gpu`: skipped with the reason where CUDA is absent (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mesh.client import MeshClient
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from tests.mesh.conftest import PROMPTS, dump, running_mesh

pytestmark = pytest.mark.gpu

NEW_TOKENS = 12


def reference(model_path) -> list[list[int]]:
    engine = Engine(Checkpoint(model_path).load_model())  # on the CPU
    return engine.complete(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False))


async def generate_all(address: str) -> list[list[int]]:
    async def one(ids):
        async with MeshClient(address, timeout_s=120) as client:
            gen = client.generate("", prompt_ids=ids, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            return [t.token_id async for t in gen]

    return await asyncio.gather(*(one(p) for p in PROMPTS))


async def status(address: str) -> dict:
    async with MeshClient(address) as client:
        return await client.status()


@pytest.mark.parametrize("policy", ["all-local", "all-remote"])
def test_cuda_main_tokens_equal_the_cpu_engine(policy, tiny_checkpoint, tmp_path):
    want = reference(tiny_checkpoint)
    with running_mesh(tiny_checkpoint, tmp_path, **{"policy.name": policy, "coordinator.device": "cuda"}) as mesh:
        got = asyncio.run(generate_all(mesh.endpoints["client"]))
        assert got == want, dump(mesh)
        engine = asyncio.run(status(mesh.endpoints["client"]))["engine"]
        assert engine["fallbacks"] == 0, dump(mesh)
        if policy == "all-remote":
            assert engine["calls"] > 0


def test_gpu_node_functions_run_on_its_gpu(tiny_checkpoint, tmp_path):
    want = reference(tiny_checkpoint)
    overrides = {"policy.name": "all-remote", "coordinator.device": "cuda", "nodes[0].kind": "gpu"}
    with running_mesh(tiny_checkpoint, tmp_path, **overrides) as mesh:
        got = asyncio.run(generate_all(mesh.endpoints["client"]))
        assert got == want, dump(mesh)
        st = asyncio.run(status(mesh.endpoints["client"]))
        assert st["instances"] and all(i["invocations"] > 0 for i in st["instances"]), dump(mesh)
        records = [json.loads(p.read_text()) for p in mesh.run_dir.rglob("*.json")]  # workers' run records
        devices = {r.get("device") for r in records if isinstance(r, dict) and r.get("function_id")}
        assert devices == {"cuda"}, f"worker run records say {devices}: does the daemon pass SpawnFunction.device?"
