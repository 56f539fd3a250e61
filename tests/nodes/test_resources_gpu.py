"""GPU figures in heartbeats (nodes/resources.py, via NVML) and on the dashboard's nodes widget.

NVML is faked: this host may have no NVIDIA library at all, which is the first case tested.
"""

from __future__ import annotations

import types

import pytest

from nodes import resources
from tui.widgets.nodes import gpus as gpus_cell

GB = 1024**3


class NVMLError(Exception):
    pass


def fake_pynvml(devices: list[dict], count_fails: bool = False) -> types.SimpleNamespace:
    """A pynvml stand-in: devices [{name, total, used, util | Exception}] (a "fail" key makes the
    device's memory query raise)."""

    def count():
        if count_fails:
            raise NVMLError("driver gone")
        return len(devices)

    def memory(handle):
        if devices[handle].get("fail"):
            raise NVMLError("GPU is lost")
        return types.SimpleNamespace(total=devices[handle]["total"], used=devices[handle]["used"])

    def utilization(handle):
        util = devices[handle]["util"]
        if isinstance(util, Exception):
            raise util
        return types.SimpleNamespace(gpu=util, memory=0)

    return types.SimpleNamespace(
        nvmlDeviceGetCount=count, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=memory, nvmlDeviceGetName=lambda h: devices[h]["name"],
        nvmlDeviceGetUtilizationRates=utilization)


@pytest.fixture
def nvml(monkeypatch):
    def install(module) -> None:
        monkeypatch.setattr(resources, "_nvml_state", {"ok": True, "pynvml": module})
    return install


def test_no_nvml_library_gives_an_empty_list(monkeypatch):
    monkeypatch.setattr(resources, "_nvml_state", {})

    def no_library():
        raise NVMLError("NVML Shared Library Not Found")

    fake = types.SimpleNamespace(nvmlInit=no_library)
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    assert resources.gpus() == []
    assert resources.snapshot()["gpus"] == []
    assert resources._nvml_state == {"ok": False}  # tried once, not on every heartbeat


def test_without_pynvml_installed(monkeypatch):
    monkeypatch.setattr(resources, "_nvml_state", {})
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import raises ImportError
    assert resources.gpus() == []


def test_figures_per_gpu(nvml):
    nvml(fake_pynvml([{"name": b"NVIDIA H200", "total": 140 * GB, "used": 35 * GB, "util": 62},
                      {"name": "NVIDIA H200", "total": 140 * GB, "used": 0, "util": 0}]))
    first, second = resources.gpus()
    assert first == {"index": 0, "name": "NVIDIA H200", "memory_total_bytes": 140 * GB,
                     "memory_used_bytes": 35 * GB, "mem_total_gb": 140.0, "mem_used_gb": 35.0,
                     "utilization_percent": 62.0}
    assert second["index"] == 1 and second["utilization_percent"] == 0.0


def test_unsupported_utilisation_keeps_the_memory(nvml):
    nvml(fake_pynvml([{"name": "A100 MIG 1g.10gb", "total": 10 * GB, "used": GB, "util": NVMLError("Not Supported")}]))
    (gpu,) = resources.gpus()
    assert gpu["utilization_percent"] is None and gpu["mem_used_gb"] == 1.0


def test_a_failing_gpu_is_left_out_and_a_failing_driver_gives_none(nvml):
    nvml(fake_pynvml([{"name": "lost", "total": GB, "used": 0, "util": 0, "fail": True},
                      {"name": "ok", "total": 2 * GB, "used": GB, "util": 10}]))
    assert [g["name"] for g in resources.gpus()] == ["ok"]
    nvml(fake_pynvml([], count_fails=True))
    assert resources.gpus() == []


def test_the_nodes_widget_shows_heartbeat_gpu_figures(nvml):
    nvml(fake_pynvml([{"name": "NVIDIA H200", "total": 140 * GB, "used": 35 * GB, "util": 62},
                      {"name": "MIG", "total": 10 * GB, "used": GB, "util": NVMLError("Not Supported")}]))
    cell = gpus_cell(resources.gpus())
    assert cell.splitlines() == ["NVIDIA H200 62% 35.0 / 140.0 GB (25%)", "MIG — 1.0 / 10.0 GB (10%)"]
    assert gpus_cell([{"name": "H100", "util": 50, "mem_used_gb": 1, "mem_total_gb": 80}]).startswith("H100 50%")
    assert gpus_cell([]) == "—"
