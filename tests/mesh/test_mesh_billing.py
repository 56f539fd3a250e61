"""The meter against the processes themselves: GB-s ledgers and cgroup limits, read back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.mesh.conftest import PROMPTS, dump, running_mesh
from tests.mesh.test_mesh_e2e import generate_all, status

REMOTE = [[0, 0], [0, 1], [1, 2]]


def _wait_all_stopped(address: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = asyncio.run(status(address))
        if st["instances"] and all(i["state"] in ("stopped", "failed") for i in st["instances"]):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"instances still up: {[i['state'] for i in st['instances']]}")


@pytest.mark.parametrize("mode", ["instance", "invocation"])
def test_gb_s_ledger_equals_memory_times_the_processes_own_times(mode, tiny_model, reference, tmp_path):
    overrides = {"policy.name": "static-split", "policy.remote": REMOTE, "functions.keep_alive_s": 1.0,
                 "billing.mode": mode, "billing.round_ms": 0, "billing.bill_init": True}
    with running_mesh(tiny_model, tmp_path, **overrides) as mesh:
        address = mesh.endpoints["client"]
        got = asyncio.run(generate_all(address, PROMPTS[:4]))
        assert [t for t, _ in got] == reference[:4]
        st = _wait_all_stopped(address)
        records = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("*.json")]
        assert len(records) == len(st["instances"]) == 2, dump(mesh)
        if mode == "instance":  # memory x lifetime, from each process's own start and exit times
            expected = sum(r["memory_gb"] * (r["stopped_at"] - r["started_at"]) for r in records)
        else:  # memory x (its own busy time + its INIT), Lambda style: the sandbox's fork ("spawn") unbilled
            expected = sum(r["memory_gb"] * (r["busy_s"] + sum(v for k, v in r["stages"].items() if k != "spawn"))
                           for r in records)
        billed = st["billing"]["gb_s_experts"]
        assert expected > 0
        assert abs(billed - expected) <= 0.02 * expected, (billed, expected, records)
        per_function = st["billing"]["by_function"]
        assert set(per_function) == {i["function_id"] for i in st["instances"]}


def test_cgroup_limits_are_applied_and_read_back(tiny_model, tmp_path):
    overrides = {"policy.name": "static-split", "policy.remote": REMOTE, "functions.cgroups": "auto"}
    with running_mesh(tiny_model, tmp_path, **overrides) as mesh:
        asyncio.run(generate_all(mesh.endpoints["client"], PROMPTS[:1]))
        st = asyncio.run(status(mesh.endpoints["client"]))
        for inst in st["instances"]:
            if inst["cgroup_skipped"]:
                pytest.skip(f"cgroups not writable here: {inst['cgroup_skipped']}")
            cgroup = inst["cgroup"]
            memory_dir, cpu_dir = Path(cgroup["memory_path"]), Path(cgroup["cpu_path"])
            assert str(inst["pid"]) in (memory_dir / "cgroup.procs").read_text().split()
            limit = int((memory_dir / "memory.limit_in_bytes").read_text())
            assert abs(limit - inst["memory_gb"] * 2**30) < 2 * 4096, (limit, inst)
            period = int((cpu_dir / "cpu.cfs_period_us").read_text())
            quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
            assert period == 10_000 and quota == round(period * inst["memory_gb"])  # 1 GB ~ 1 vCPU


def test_cgroups_off_is_skipped_with_a_reason(tiny_model, tmp_path):
    overrides = {"policy.name": "static-split", "policy.remote": [[0, 0]], "functions.cgroups": "off"}
    with running_mesh(tiny_model, tmp_path, **overrides) as mesh:
        asyncio.run(generate_all(mesh.endpoints["client"], PROMPTS[:1]))
        (inst,) = asyncio.run(status(mesh.endpoints["client"]))["instances"]
        assert inst["cgroup"] is None or not inst["cgroup"]
        assert "cgroups" in inst["cgroup_skipped"]
