"""Synthetic meter snapshots for `--demo` and the screen goldens: a small mesh that evolves.

    demo_payloads(seed=0, start=time.time(), interval=1.0) -> endless Iterator[payload]

Three nodes (one GPU host, two CPU hosts; cpu-2 drops out for a while), a 4-layer x
8-expert model, six expert functions whose instances start, serve, idle and stop, SLO
percentiles that drift, stragglers now and then. Deterministic for a given seed and start.
Figures follow the payload schema only; they model nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

LAYERS, EXPERTS = 4, 8
MAIN_GB, ALL_LOCAL_GB = 24.0, 40.0
PRICE_PER_GB_S = 0.0000166667  # Lambda's list price per GB-s
NODES = (("gpu-0", "gpu", "10.0.0.1"), ("cpu-1", "cpu", "10.0.0.2"), ("cpu-2", "cpu", "10.0.0.3"))
CLASSES = {"interactive": (0.5, 0.05), "batch": (5.0, 0.2)}
DOWN_TICKS = range(40, 60)  # cpu-2 is unreachable in these ticks


def demo_payloads(seed: int = 0, start: float = 1_700_000_000.0, interval: float = 1.0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    popularity = [[rng.paretovariate(1.5) for _ in range(EXPERTS)] for _ in range(LAYERS)]
    local = [[layer, e] for layer, row in enumerate(popularity) for e in sorted(range(EXPERTS), key=lambda e: -row[e])[:2]]
    remote = [[layer, e] for layer in range(LAYERS) for e in range(EXPERTS) if [layer, e] not in local]
    functions = [
        {"id": f"fn-{n}", "experts": remote[n::6], "memory_gb": 1.5, "replicas": 1 + n % 2,
         "nodes": [NODES[1 + n % 2][0]]}
        for n in range(6)
    ]
    instances = {
        f"{f['id']}-r{r}": {"instance_id": f"{f['id']}-r{r}", "function_id": f["id"], "node": f["nodes"][0],
                           "state": "starting", "memory_gb": f["memory_gb"], "experts": f["experts"],
                           "replica": r, "keep_alive_left_s": 30.0, "invocations": 0,
                           "started_at": start, "stopped_at": None}
        for f in functions for r in range(f["replicas"])
    }
    gb_s_main = gb_s_experts = baseline = 0.0
    by_function = {f["id"]: {"gb_s": 0.0, "cost": 0.0, "invocations": 0} for f in functions}
    cold_starts: list[dict[str, Any]] = []
    stragglers: list[dict[str, Any]] = []
    requests = {name: [0, 0] for name in CLASSES}
    tick = 0
    while True:
        now = start + tick * interval
        rate_experts = 0.0
        for inst in instances.values():
            step_instance(rng, inst, now, interval, cold_starts, down=inst["node"] == "cpu-2" and tick in DOWN_TICKS)
            if inst["state"] in ("starting", "warm", "busy", "idle"):
                rate_experts += inst["memory_gb"]
                by_function[inst["function_id"]]["gb_s"] += inst["memory_gb"] * interval
                by_function[inst["function_id"]]["invocations"] = sum(
                    i["invocations"] for i in instances.values() if i["function_id"] == inst["function_id"]
                )
        for entry in by_function.values():
            entry["cost"] = entry["gb_s"] * PRICE_PER_GB_S
        gb_s_main += MAIN_GB * interval
        gb_s_experts += rate_experts * interval
        baseline += ALL_LOCAL_GB * interval
        if tick % 7 == 3:
            straggle(rng, stragglers, instances, now)
        for counts in requests.values():
            new = rng.randint(2, 12)
            counts[0] += new
            counts[1] += sum(rng.random() < 0.93 for _ in range(new))
        gb_s = gb_s_main + gb_s_experts
        yield {
            "time": now, "uptime_s": tick * interval + 5.0, "seq": tick,
            "policy": {"name": "moeless", "reason": "layer-aware forecast: 2 hot experts per layer kept local",
                       "plan": {"main_memory_gb": MAIN_GB, "local": local, "functions": functions}},
            "billing": {"mode": "instance", "currency": "USD", "gb_s": gb_s, "cost": gb_s * PRICE_PER_GB_S,
                        "gb_s_main": gb_s_main, "gb_s_experts": gb_s_experts,
                        "rate_gb_s_per_s": MAIN_GB + rate_experts,
                        "by_function": {k: dict(v) for k, v in by_function.items()},
                        "baseline_all_local_gb_s": baseline, "baseline_all_local_cost": baseline * PRICE_PER_GB_S},
            "slo": slo(rng, requests),
            "stragglers": {"recent": list(stragglers),
                           "imbalance": {str(layer): round(max(row) / (sum(row) / EXPERTS), 2)
                                         for layer, row in enumerate(popularity)}},
            "nodes": nodes(rng, tick),
            "instances": [dict(i) for i in instances.values()],
            "cold_starts": list(cold_starts),
            "load": {"layers": LAYERS, "experts": EXPERTS,
                     "counts": [[round(p * rng.uniform(20, 30)) for p in row] for row in popularity]},
        }
        tick += 1


def step_instance(
    rng: random.Random, inst: dict[str, Any], now: float, interval: float, cold_starts: list, *, down: bool
) -> None:
    state = inst["state"]
    if down:
        if state not in ("stopped", "failed"):
            inst.update(state="failed", stopped_at=now, keep_alive_left_s=None)
    elif state == "starting" and rng.random() < 0.5:
        inst["state"] = "warm"
        stages = {"spawn": rng.uniform(0.01, 0.05), "limits": rng.uniform(0.001, 0.01),
                  "weights": rng.uniform(0.2, 1.5), "ready": rng.uniform(0.01, 0.1)}
        cold_starts.insert(0, {"time": now, "instance_id": inst["instance_id"], "function_id": inst["function_id"],
                               "node": inst["node"], "path": rng.choice(("zygote", "zygote", "fresh")),
                               "stages": stages, "total_s": sum(stages.values()),
                               "critical_path": rng.random() < 0.3})
        del cold_starts[12:]
    elif state in ("warm", "busy", "idle"):
        inst["state"] = rng.choices(("busy", "idle", "warm"), (5, 2, 1))[0]
        if inst["state"] == "busy":
            inst["invocations"] += rng.randint(1, 20)
            inst["keep_alive_left_s"] = 30.0
        else:
            inst["keep_alive_left_s"] = max(inst["keep_alive_left_s"] - interval * rng.uniform(1, 8), 0.0)
            if inst["keep_alive_left_s"] == 0.0:
                inst["state"], inst["stopped_at"], inst["keep_alive_left_s"] = "stopped", now, None
    elif state in ("stopped", "failed") and rng.random() < 0.2:
        inst.update(state="starting", started_at=now, stopped_at=None, keep_alive_left_s=30.0)


def straggle(rng: random.Random, stragglers: list, instances: dict, now: float) -> None:
    inst = rng.choice(list(instances.values()))
    median = rng.uniform(0.002, 0.006)
    ratio = rng.uniform(3.0, 9.0)
    stragglers.insert(0, {"time": now, "function_id": inst["function_id"], "instance_id": inst["instance_id"],
                          "layer": rng.randrange(LAYERS), "latency_s": median * ratio, "median_s": median,
                          "ratio": ratio})
    del stragglers[10:]


def slo(rng: random.Random, requests: dict[str, list[int]]) -> dict[str, Any]:
    classes = {}
    for name, (ttft_target, tpot_target) in CLASSES.items():
        total, attained = requests[name]
        ttft50, tpot50 = ttft_target * rng.uniform(0.3, 0.6), tpot_target * rng.uniform(0.3, 0.6)
        classes[name] = {
            "ttft_target_s": ttft_target, "tpot_target_s": tpot_target, "requests": total,
            "attained": attained, "attainment": attained / total if total else 1.0,
            "ttft": {"p50": ttft50, "p95": ttft50 * rng.uniform(1.5, 2.2), "p99": ttft50 * rng.uniform(2.0, 3.0)},
            "tpot": {"p50": tpot50, "p95": tpot50 * rng.uniform(1.5, 2.2), "p99": tpot50 * rng.uniform(2.0, 3.0)},
        }
    total = sum(t for t, _ in requests.values())
    return {"window_s": 60.0, "requests_total": total, "requests_active": rng.randint(0, 8), "classes": classes}


def nodes(rng: random.Random, tick: int) -> list[dict[str, Any]]:
    out = []
    for name, kind, host in NODES:
        down = name == "cpu-2" and tick in DOWN_TICKS
        gpus = [{"name": "H100", "util": rng.uniform(30, 90), "mem_used_gb": 30.0 + rng.uniform(0, 5),
                 "mem_total_gb": 80.0}] if kind == "gpu" else []
        out.append({
            "name": name, "kind": kind, "host": host, "alive": not down,
            "last_heartbeat_s_ago": (tick - DOWN_TICKS.start) * 1.0 + 1 if down else rng.uniform(0, 1),
            "cpu_percent": rng.uniform(5, 80), "mem_used_gb": rng.uniform(4, 12), "mem_total_gb": 32.0,
            "capacity_gb": 16.0, "gpus": gpus,
        })
    return out
