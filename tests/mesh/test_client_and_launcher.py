"""The client SDK's contract and mesh-up's lifecycle, against real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from mesh.client import MeshClient, SyncMeshClient
from mesh.errors import Cancelled, MeshUnavailable, RequestRejected, Timeout
from tests.mesh.conftest import (
    PROMPTS,
    mesh_config,
    mesh_up_address,
    running_mesh,
    sigterm_leaves_nothing,
)


def test_unreachable_coordinator_is_mesh_unavailable_with_a_hint():
    async def run():
        async with MeshClient("tcp://127.0.0.1:9", connect_timeout_s=0.5):
            pass

    with pytest.raises(MeshUnavailable) as err:
        asyncio.run(run())
    assert "mesh-up" in err.value.hint


def test_rejections_cancellation_timeout_and_the_sync_wrapper(tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-local",
                                               "coordinator.request_timeout_s": 8.0}) as mesh:
        address = mesh.endpoints["client"]

        async def run():
            async with MeshClient(address, timeout_s=30) as client:
                with pytest.raises(RequestRejected, match="unknown SLO class"):
                    async for _ in client.generate("", prompt_ids=[1, 2], max_new_tokens=4, slo_class="gold"):
                        pass
                with pytest.raises(RequestRejected):
                    async for _ in client.generate("", prompt_ids=[999999], max_new_tokens=4):
                        pass
                # cancel mid-stream: the stream ends with Cancelled at once, the mesh frees the
                # request. However many tokens are already on their way or queued in the client
                # when cancel() returns, none is yielded after it (no timing involved).
                gen = client.generate("", prompt_ids=PROMPTS[0], max_new_tokens=5000, stop_at_eos=False)
                got = []
                with pytest.raises(Cancelled):
                    async for token in gen:
                        got.append(token.token_id)
                        if len(got) == 3:
                            await gen.cancel()
                assert got == reference[0][:3]
                assert [t.token_id for t in gen.tokens] == got and gen.done is None
                # a request that outlives coordinator.request_timeout_s fails with a typed Timeout
                with pytest.raises(Timeout, match="request_timeout_s"):
                    async for _ in client.generate("", prompt_ids=PROMPTS[1], max_new_tokens=100000,
                                                   stop_at_eos=False):
                        pass
                status = await client.status()
                assert status["slo"]["requests_active"] == 0
                return status

        asyncio.run(run())
        with SyncMeshClient(address) as client:
            tokens = [t.token_id for t in client.generate("", prompt_ids=PROMPTS[2], max_new_tokens=12,
                                                         stop_at_eos=False)]
        assert tokens == reference[2]


def test_mesh_up_runs_and_sigterm_leaves_nothing_behind(tiny_model, tmp_path):
    config = mesh_config(tiny_model, **{"policy.name": "all-remote"})
    toml = tmp_path / "launch.toml"
    toml.write_text(_to_toml(config.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "mesh.launcher", "--config", str(toml), "--log-dir",
                             str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        address = mesh_up_address(proc)
        with SyncMeshClient(address) as client:
            assert [t for t in client.generate("", prompt_ids=PROMPTS[0], max_new_tokens=4, stop_at_eos=False)]
        assert len(sigterm_leaves_nothing(proc)) >= 4  # mesh-up, coordinator, daemon, zygote (+ workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _to_toml(d: dict) -> str:
    """A launch.toml from MeshConfig.to_dict() (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []

    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    def table(prefix: str, body: dict) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict) and v is not None}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for key, body in d.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{key}]]")
                lines.extend(f"{k} = {value(v)}" for k, v in item.items() if v is not None)
        else:
            table(key, body)
    return "\n".join(lines) + "\n"
