"""Rung 2 of the correctness ladder, with real processes: mesh output == in-process output.

Each test brings up a real mesh (coordinator + node daemon + zygote + expert workers, real
ZeroMQ sockets, real safetensors) on a tiny random checkpoint and compares greedy tokens with
the in-process engine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh.client import MeshClient
from tests.mesh.conftest import PROMPTS, dump, running_mesh

NEW_TOKENS = 12


async def generate_all(address: str, prompts=PROMPTS, max_new_tokens: int = NEW_TOKENS):
    """One client connection per prompt, all concurrent: 8 clients share each decode step."""

    async def one(ids):
        async with MeshClient(address, timeout_s=60) as client:
            gen = client.generate("", prompt_ids=ids, max_new_tokens=max_new_tokens, stop_at_eos=False)
            return [t.token_id async for t in gen], gen.done

    return await asyncio.gather(*(one(p) for p in prompts))


async def status(address: str) -> dict:
    async with MeshClient(address) as client:
        return await client.status()


@pytest.mark.parametrize("policy,extra", [
    ("all-local", {}),
    ("all-remote", {}),
    ("static-split", {"policy.remote": [[0, 1], [1, 2], [1, 3]]}),
    *[(name, {"policy.replan_every": 1}) for name in ("mix", "remoe", "moeless", "bayesian", "moemesh")],
])
def test_mesh_tokens_equal_in_process(policy, extra, tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": policy, **extra}) as mesh:
        results = asyncio.run(generate_all(mesh.endpoints["client"]))
        got = [tokens for tokens, _ in results]
        assert got == reference, dump(mesh)
        st = asyncio.run(status(mesh.endpoints["client"]))
        engine = st["engine"]
        assert engine["fallbacks"] == 0, dump(mesh)
        if policy in ("all-local", "mix"):
            assert engine["calls"] == 0 and not st["instances"]
        elif policy in ("remoe", "moeless", "bayesian", "moemesh"):  # adaptive: re-planned per request
            assert st["policy"]["name"] == policy and st["policy"]["forecast"]["source"]
            assert all(done.record["activation"]["prefill"] for _, done in results)
        else:  # the remote path really ran: functions cold-started and served calls
            assert engine["calls"] > 0
            expected = 8 if policy == "all-remote" else 2  # one function per expert / per layer
            assert len({i["function_id"] for i in st["instances"]}) == expected
            assert all(i["invocations"] > 0 for i in st["instances"])
        for done in (d for _, d in results):
            assert done.generated_tokens == NEW_TOKENS and done.record["slo"]["ttft_target_s"] > 0


def test_cold_start_then_warm_then_scale_to_zero(tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "static-split", "policy.remote": [[0, 0], [0, 1]],
                                               "functions.keep_alive_s": 1.5}) as mesh:
        address = mesh.endpoints["client"]
        first = asyncio.run(generate_all(address, PROMPTS[:2]))
        assert [t for t, _ in first] == reference[:2]
        st = asyncio.run(status(address))
        assert len(st["instances"]) == 1 and st["instances"][0]["state"] == "warm", dump(mesh)
        (cold,) = st["cold_starts"]  # its stages, each measured, reached the meter
        assert set(cold["stages"]) >= {"spawn", "limits", "weights", "ready"} and cold["total_s"] > 0
        assert cold["critical_path"]  # the first request waited for it
        assert any(done.record["cold_starts_on_path"] for _, done in first)
        # warm: a second request starts no new instance
        second = asyncio.run(generate_all(address, PROMPTS[2:3]))
        assert [t for t, _ in second] == reference[2:3]
        st2 = asyncio.run(status(address))
        assert len(st2["instances"]) == 1 and not second[0][1].record["cold_starts_on_path"]
        # scale to zero after the keep-alive: the daemon reports the idle exit
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st3 = asyncio.run(status(address))
            if all(i["state"] == "stopped" for i in st3["instances"]):
                break
        assert [i["stop_reason"] for i in st3["instances"]] == ["idle"], dump(mesh)

