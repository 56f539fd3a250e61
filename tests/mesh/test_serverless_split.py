"""The serverless split made real: memory held = memory billed, replicas share rows, failures
are SLO misses, a function nobody can host is loaded on demand and billed (real processes where
a mesh runs, the real coordinator object and real safetensors elsewhere)."""

from __future__ import annotations

import asyncio

import pytest

from mesh import planning
from mesh.coordinator import Coordinator
from mesh.meter import Meter, Prices
from nodes.model.checkpoint import Checkpoint
from tests.mesh.conftest import PROMPTS, TINY, dump, mesh_config, running_mesh
from tests.mesh.test_mesh_e2e import generate_all, status

EXPERT_BYTES = 3 * TINY["hidden_size"] * TINY["intermediate_size"] * 4  # float32 SwiGLU


def _non_expert_bytes(path) -> int:
    return Checkpoint(path).load_model(experts=()).held_bytes()


@pytest.mark.parametrize("policy, extra, local", [
    ("all-local", {}, 8),
    ("all-remote", {}, 0),
    ("static-split", {"policy.remote": [[0, 1], [1, 2], [1, 3]]}, 5),
])
def test_main_function_is_billed_for_the_tensors_it_holds(policy, extra, local, tiny_model):
    coordinator = Coordinator(mesh_config(tiny_model, **{"policy.name": policy, **extra}))
    try:
        held = coordinator.model.held_bytes()
        tensors = {id(t): t for t in (*coordinator.model.parameters(), *coordinator.model.buffers())}
        assert held == sum(t.numel() * t.element_size() for t in tensors.values())
        assert held == _non_expert_bytes(tiny_model) + local * EXPERT_BYTES
        assert coordinator.model.held_experts() == set(coordinator.plan.local)
        snap = coordinator.meter.snapshot()
        assert snap["main"]["held_bytes"] == held and snap["main"]["experts"] == local
        billed = planning.main_billed_gb(held, coordinator.config, coordinator.profiles, coordinator.workload)
        assert coordinator.meter.main_memory_gb == billed
        assert coordinator.plan.main.memory_gb == billed  # the planner assumed what runs
    finally:
        coordinator.executor.close()
        coordinator.context.term()


def test_failed_and_timed_out_requests_are_slo_misses():
    now = [0.0]
    meter = Meter(Prices(), {"interactive": (1.0, 0.5)}, clock=lambda: now[0])
    for rid in ("ok", "error-no-token", "timeout-with-tokens", "cancelled"):
        meter.request_admitted(rid, "interactive", 4)
    now[0] = 0.1
    for rid in ("ok", "timeout-with-tokens", "cancelled"):
        meter.token(rid)
    now[0] = 0.2
    records = {rid: meter.request_done(rid, reason) for rid, reason in (
        ("ok", "length"), ("error-no-token", "error"), ("timeout-with-tokens", "timeout"), ("cancelled", "cancelled"))}
    assert records["ok"]["slo"]["met"]
    assert not records["error-no-token"]["slo"]["met"]  # no TTFT is a miss, not a zero
    assert not records["timeout-with-tokens"]["slo"]["met"]  # fast tokens, but it failed
    slo = meter.snapshot()["slo"]["classes"]["interactive"]
    assert (slo["requests"], slo["attained"], slo["failed"], slo["cancelled"]) == (3, 1, 2, 1)


def test_replicas_split_a_rounds_rows(tiny_model, reference, tmp_path):
    remote = [[0, e] for e in range(4)]  # every layer-0 expert in one function, two replicas
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "static-split", "policy.remote": remote,
                                               "policy.function_replicas": 2}) as mesh:
        address = mesh.endpoints["client"]
        asyncio.run(generate_all(address, PROMPTS[:1], 2))  # admission warms the plan's functions
        before = _until(address, lambda st: len(_replicas(st)) == 2)
        got = asyncio.run(generate_all(address, PROMPTS))
        assert [t for t, _ in got] == reference, dump(mesh)
        after = asyncio.run(status(address))
        assert {i["instance_id"] for i in _replicas(after)} == {i["instance_id"] for i in _replicas(before)}
        rows = sorted(a["rows"] - b["rows"] for a, b in zip(
            sorted(_replicas(after), key=_id), sorted(_replicas(before), key=_id), strict=True))
        routed = sum(after["load"]["counts"][0]) - sum(before["load"]["counts"][0])
        steps = after["steps"] - before["steps"]
        assert after["data_plane"]["fallbacks"] == 0, after["data_plane"]
        # every layer-0 slot was computed by exactly one replica, and both shared the work evenly:
        # per round the two halves differ by at most one row
        assert sum(rows) == routed
        assert rows[1] - rows[0] <= steps, (rows, steps)
        assert rows[0] >= routed // 2 - steps
        # the planner now takes the dense work from the mesh's own steps (planning.calibrated_profiles)
        assert after["steps"] >= 12 and after["calibrated"]["dense_s"] > 0, after["calibrated"]


def _id(instance: dict) -> str:
    return instance["instance_id"]


def _replicas(st: dict) -> list[dict]:
    return [i for i in st["instances"] if i["function_id"] == "L0-r0" and i["state"] == "warm"]


def _until(address: str, condition, deadline_s: float = 60.0) -> dict:
    """Poll the mesh's status until `condition(status)` holds (an outcome, not a sleep)."""
    import time

    end = time.monotonic() + deadline_s
    while True:
        st = asyncio.run(status(address))
        if condition(st):
            return st
        assert time.monotonic() < end, f"condition not reached in {deadline_s} s: {st['instances']}"
        time.sleep(0.1)


def test_a_function_no_node_can_host_is_loaded_on_demand_and_billed(tiny_model, reference, tmp_path):
    # nodes too small for any function: the main function computes every expert, loading each on
    # first use (a cold start on the critical path) and paying for what it then holds
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote", "nodes[0].capacity_gb": 0.1}) as mesh:
        address = mesh.endpoints["client"]
        got = asyncio.run(generate_all(address, PROMPTS))
        assert [t for t, _ in got] == reference, dump(mesh)
        st = asyncio.run(status(address))
        loads = [c for c in st["cold_starts"] if c["function_id"] == "main" and c["path"] == "on-demand"]
        loaded = {tuple(e) for c in loads for e in c["experts"]}
        assert loads and all(c["critical_path"] for c in loads), st["cold_starts"]
        assert st["data_plane"]["on_demand_loads"] == len(loads)
        assert st["data_plane"]["calls"] == 0 and st["data_plane"]["fallbacks"] > 0
        assert st["main"]["experts"] == len(loaded)
        assert st["main"]["held_bytes"] == _non_expert_bytes(tiny_model) + len(loaded) * EXPERT_BYTES
        assert any(r["cold_starts_on_path"] for r in st["records"]), "the first requests waited for loads"


def test_cold_start_load_runs_a_cold_functions_rows_in_the_main_function(tiny_model, reference, tmp_path):
    # [functions] cold_start = "load": while the functions start (slowly: start_delay_s), the
    # first requests' rows of each cold function run in the main function, its experts loaded on
    # demand (billed, on the critical path); no round waits for a process; once the functions
    # are warm the main function drops those experts again and the calls go remote
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote", "functions.cold_start": "load",
                                               "functions.start_delay_s": 2.0}) as mesh:
        address = mesh.endpoints["client"]
        got = asyncio.run(generate_all(address, PROMPTS))
        assert [t for t, _ in got] == reference, dump(mesh)
        st = asyncio.run(status(address))
        assert st["data_plane"]["on_demand_loads"] > 0 and st["data_plane"]["cold_start_waits"] == 0, st["data_plane"]
        assert any(r["cold_starts_on_path"] for r in st["records"])
        functions = len({i["function_id"] for i in st["instances"]})
        st = _until(address, lambda s: len({i["function_id"] for i in s["instances"] if i["state"] == "warm"})
                    == functions)
        got = asyncio.run(generate_all(address, PROMPTS[:1]))  # a step boundary after warm: the main drops
        assert [t for t, _ in got] == reference[:1], dump(mesh)
        st = asyncio.run(status(address))
        assert st["main"]["experts"] == 0 and st["main"]["held_bytes"] == _non_expert_bytes(tiny_model), st["main"]
        assert st["data_plane"]["calls"] > 0


def test_calls_through_shared_memory_give_the_same_tokens(tiny_model, reference, tmp_path):
    # policy.shm_min_bytes = 1: every call's rows go to the workers (on this host) through a
    # sealed memfd slot, only a descriptor on ZeroMQ; the replies come back in the same slot
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote", "policy.shm_min_bytes": 1}) as mesh:
        address = mesh.endpoints["client"]
        got = asyncio.run(generate_all(address, PROMPTS))
        assert [t for t, _ in got] == reference, dump(mesh)
        dp = asyncio.run(status(address))["data_plane"]
        assert dp["shm_calls"] == dp["calls"] > 0 and dp["fallbacks"] == 0, dp
