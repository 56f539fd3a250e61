"""What a host has, for the node's heartbeats: CPU and memory (psutil), GPUs (pynvml, if any).

    snapshot()  -> {"cpus": 2, "cpu_percent": 37.5, "load_1m": 0.8,
                    "memory_total_bytes": ..., "memory_used_bytes": ..., "memory_available_bytes": ...,
                    "mem_total_gb": ..., "mem_used_gb": ...,                   (what the coordinator reads)
                    "gpus": [{"index": 0, "name": ..., "memory_total_bytes": ..., "memory_used_bytes": ...,
                              "mem_total_gb": ..., "mem_used_gb": ...,
                              "utilization_percent": ... (None where NVML cannot say)}]}
    process_rss(pid) -> bytes, or None when the process is gone

`cpu_percent` is measured since the previous call (psutil's non-blocking mode; the first call
reads 0.0). Without NVIDIA's library or driver, "gpus" is an empty list, never an exception;
NVML is initialised once per process (the first heartbeat) and a GPU whose figures fail this
heartbeat is left out of it (a driver hiccup must not stop heartbeats).
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)
GB = 1024**3

_nvml_state: dict[str, object] = {}  # "ok": bool once tried; "pynvml": the module


def snapshot() -> dict:
    """Host CPU, memory and GPU figures (plain values: msgpack-able)."""
    memory = psutil.virtual_memory()
    try:
        load_1m = os.getloadavg()[0]
    except OSError:
        load_1m = 0.0
    return {
        "cpus": psutil.cpu_count() or 1,
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "load_1m": float(load_1m),
        "memory_total_bytes": int(memory.total),
        "memory_used_bytes": int(memory.total - memory.available),
        "memory_available_bytes": int(memory.available),
        "mem_total_gb": memory.total / GB,
        "mem_used_gb": (memory.total - memory.available) / GB,
        "gpus": gpus(),
    }


def gpus() -> list[dict]:
    """One dict per NVIDIA GPU; [] without pynvml or a driver."""
    pynvml = _nvml()
    if pynvml is None:
        return []
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # noqa: BLE001 - a driver hiccup must not stop heartbeats
        log.warning("GPU figures unavailable this heartbeat: %s", exc)
        return []
    out = []
    for index in range(count):
        try:
            out.append(_gpu(pynvml, index))
        except Exception as exc:  # noqa: BLE001
            log.warning("GPU %d figures unavailable this heartbeat: %s", index, exc)
    return out


def _gpu(pynvml, index: int) -> dict:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = pynvml.nvmlDeviceGetName(handle)
    try:  # not supported on some devices (MIG slices, some vGPUs): memory still counts
        utilization = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001
        utilization = None
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "memory_total_bytes": int(memory.total),
        "memory_used_bytes": int(memory.used),
        "mem_total_gb": int(memory.total) / GB,
        "mem_used_gb": int(memory.used) / GB,
        "utilization_percent": utilization,
    }


def _nvml():
    if "ok" not in _nvml_state:
        _nvml_state["ok"] = False
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, or NVMLError without a driver
            log.debug("no GPU figures (pynvml: %s)", exc)
        else:
            _nvml_state.update(ok=True, pynvml=pynvml)
    return _nvml_state.get("pynvml") if _nvml_state["ok"] else None


def process_rss(pid: int) -> int | None:
    """Resident set size of `pid` in bytes, None if it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
