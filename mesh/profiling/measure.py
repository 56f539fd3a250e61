"""The measurements of `moemesh profile`: samples from real function instances, nothing fitted.

    measure(...)   one daemon at the sweep's CFS period: sweep, cold starts, a period run;
                   a second daemon at --period-us-compare: its period run
    sweep          latency vs (memory, tokens): one function per size, all warm at once
    cold_starts    seconds from SpawnFunction to InstanceReady vs the weight bytes read
    cold_burst     --cold-burst one-expert functions requested at once over the config's CPU
                   nodes (a daemon each): each one's fork wait, INIT and ready time (what
                   allocator.coldstart's spawn-path weight is fitted to)
    period_run     back-to-back small calls at a fractional CPU share for a while

Each function's cgroup cpu.stat is read around its calls, so what the CFS quota did (periods,
throttled periods and seconds) is recorded beside the latencies.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mesh.config import MeshConfig
from mesh.profiling.caller import Caller
from mesh.profiling.node import Node
from mesh.profiling.settings import Settings
from nodes.model.config import MoEConfig
from nodes.worker import read_run_record

WARMUP_CALLS = 3


def stats(values) -> dict:
    """median, p90, p99, mean, max and n of a list of seconds."""
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(np.mean(a)), "max": float(np.max(a)),
            "n": int(a.size)}


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.step, self.quiet = total, 0, quiet

    def show(self, what: str, advance: int = 0) -> None:
        self.step = min(self.total, self.step + advance)
        if self.quiet:
            return
        bar = "#" * int(30 * self.step / self.total)
        print(f"\r[{bar:<30}] {self.step}/{self.total} {what:<52.52}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.step = self.total
        self.show("done")
        if not self.quiet:
            print(file=sys.stderr)


def compares(s: Settings, config: MeshConfig) -> bool:
    """Whether a second daemon runs at --period-us-compare (a period other than the sweep's)."""
    return bool(s.period_us_compare) and s.period_us_compare != config.functions.cfs_period_us


def steps(s: Settings, config: MeshConfig) -> int:
    """How many steps the progress bar of a run has (measure() advances all but the last)."""
    rounds = max(1, min(s.rounds, s.calls))
    return (1 + rounds + len(s.cold_experts) * s.cold_repeats + (1 if s.cold_burst else 0) + 2
            + (2 if compares(s, config) else 0))


@dataclass
class Measurement:
    """What measure() brings back.

    samples:  (memory_gb, tokens) -> {"round_trip_s", "compute_s": [calls], "round_means_s": [rounds]}
    cgroups:  per swept memory size: {"memory_gb", "enforced", "memory_enforced", "skipped",
              "values", "throttling"}
    cold:     per cold start: {"experts", "bytes", "seconds", "stages"}
    periods:  per CFS period: a period_run() record
    burst:    cold_burst()'s record, None with --cold-burst 0
    """

    samples: dict
    cgroups: list[dict]
    cold: list[dict]
    periods: list[dict]
    burst: dict | None = None


def measure(config: MeshConfig, s: Settings, model_path: Path, model: MoEConfig, memory: tuple[float, ...],
            tokens: tuple[int, ...], progress: Progress) -> Measurement:
    """Run the sweep, the cold starts and the period runs on real node daemons (logs kept in a
    temporary folder, removed on success and named on stderr on failure)."""
    f = config.functions
    dtype = getattr(torch, config.model.dtype)
    run_dir = Path(tempfile.mkdtemp(prefix="moemesh-profile-"))
    try:
        progress.show(f"starting a node daemon ({f.cfs_period_us / 1000:g} ms CFS period)")
        # the sweep's daemon is also the burst's first node: it starts as many INITs at once
        with Node(config, model_path, f.cfs_period_us, run_dir, "a",
                  init_cpus=f.init_capacity(burst_nodes(config)[0][1])) as node:
            node.wait_warm()
            samples, cgroups = sweep(node, s, memory, tokens, model.hidden_size, dtype, progress)
            cold = cold_starts(node, s, model.num_experts, model.num_moe_layers, progress)
            burst = (cold_burst(node, config, model_path, run_dir, s, model.num_experts, model.num_moe_layers,
                                s.burst_memory, progress) if s.cold_burst else None)
            progress.show(f"CFS period {f.cfs_period_us / 1000:g} ms: {s.period_seconds:g} s of calls")
            periods = [period_run(node, s, model.hidden_size, dtype)]
            progress.show("", advance=1)
        if compares(s, config):
            progress.show(f"starting a node daemon ({s.period_us_compare / 1000:g} ms CFS period)")
            with Node(config, model_path, s.period_us_compare, run_dir, "b") as node:
                node.wait_warm()
                progress.show("", advance=1)
                progress.show(f"CFS period {s.period_us_compare / 1000:g} ms: {s.period_seconds:g} s of calls")
                periods.append(period_run(node, s, model.hidden_size, dtype))
                progress.show("", advance=1)
    except BaseException:
        if not s.quiet:
            print(file=sys.stderr)
        print(f"moemesh profile: logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    return Measurement(samples, cgroups, cold, periods, burst)


# -------------------------------------------------------------------------- cgroup counters


def cgroup_state(ready) -> dict:
    """What an InstanceReady says of its cgroup: CPU quota and memory limit enforced, why not."""
    values = ready.cgroup or {}
    return {"enforced": "cpu_quota_us" in values, "memory_enforced": "memory_limit_bytes" in values,
            "skipped": ready.cgroup_skipped, "values": {k: v for k, v in values.items() if not k.endswith("_path")}}


def cpu_stat(ready) -> dict[str, int]:
    """The instance's cgroup cpu.stat (nr_periods, nr_throttled, throttled_time ns); {} if none."""
    path = (ready.cgroup or {}).get("cpu_path")
    if not path:
        return {}
    try:
        return {k: int(v) for k, v in (line.split() for line in Path(path, "cpu.stat").read_text().splitlines())
                if k in ("nr_periods", "nr_throttled", "throttled_time")}
    except (OSError, ValueError):
        return {}


def throttling(before: dict, after: dict) -> dict:
    """What the CFS quota did between two cpu.stat reads (empty without a cgroup)."""
    if not before or not after:
        return {}
    periods = after["nr_periods"] - before["nr_periods"]
    throttled = after["nr_throttled"] - before["nr_throttled"]
    return {"periods": periods, "throttled_periods": throttled,
            "throttled_s": (after["throttled_time"] - before["throttled_time"]) / 1e9}


# ----------------------------------------------------------------------------- measurements


def sweep(node: Node, s: Settings, memory_sizes, token_counts, hidden: int, dtype, progress: Progress):
    """Latency vs (memory, tokens): one function per size, all warm at once.

    The calls go in rounds; each round visits every size in turn with `calls / rounds` calls of
    every token count (interleaved), so a burst of other work on the host lands in a few rounds
    of every size instead of all of one size. Per point: every call's round trip and compute_s,
    and each round's mean round trip (the fit takes the median of those means)."""
    rounds = max(1, min(s.rounds, s.calls))
    per_round = math.ceil(s.calls / rounds)
    samples = {(m, t): {"round_trip_s": [], "compute_s": [], "round_means_s": []}
               for m in memory_sizes for t in token_counts}
    functions, cgroups = [], {}
    try:
        for memory in memory_sizes:
            progress.show(f"latency: spawning a {memory:g} GB function")
            ready, _ = node.spawn([(0, 0)], memory)
            functions.append((memory, ready, Caller(ready.endpoint, hidden, dtype, node.config)))
            cgroups[memory] = {"memory_gb": memory, **cgroup_state(ready), "throttling": {}}
        for _, _, caller in functions:
            for tokens in token_counts:
                for _ in range(WARMUP_CALLS):
                    caller.call(0, 0, tokens)
        progress.show("", advance=1)
        for r in range(rounds):
            progress.show(f"latency: round {r + 1}/{rounds}, {len(functions)} sizes")
            for memory, ready, caller in functions:
                n = min(per_round, s.calls - r * per_round)
                if n <= 0:
                    continue
                before = cpu_stat(ready)
                times: dict[int, list[float]] = {t: [] for t in token_counts}
                for _ in range(n):
                    for tokens in token_counts:
                        rt, compute = caller.call(0, 0, tokens)
                        times[tokens].append(rt)
                        samples[(memory, tokens)]["compute_s"].append(compute)
                total = cgroups[memory]["throttling"]
                for key, value in throttling(before, cpu_stat(ready)).items():
                    total[key] = total.get(key, 0) + value
                for tokens, rts in times.items():
                    samples[(memory, tokens)]["round_trip_s"].extend(rts)
                    samples[(memory, tokens)]["round_means_s"].append(float(np.mean(rts)))
            progress.show("", advance=1)
    finally:
        for _, _, caller in functions:
            caller.close()
    for _, ready, _ in functions:
        node.stop(ready.instance_id)
    return samples, list(cgroups.values())


def cold_starts(node: Node, s: Settings, experts_per_layer: int, layers: int, progress: Progress) -> list[dict]:
    """--cold-repeats rounds over the --cold-experts sizes (interleaved): each function spawned,
    timed from SpawnFunction to InstanceReady, its weight bytes read from the worker's run
    record, its stage times from InstanceReady, then stopped."""
    out = []
    for repeat in range(s.cold_repeats):
        for n in s.cold_experts:  # interleaved sizes
            experts = [(i // experts_per_layer % layers, i % experts_per_layer) for i in range(n)]
            progress.show(f"cold start: {n} experts ({repeat + 1}/{s.cold_repeats})")
            ready, elapsed = node.spawn(experts, s.cold_memory)
            record = read_run_record(node.run_dir, ready.instance_id)
            node.stop(ready.instance_id)
            out.append({"experts": n, "bytes": int(record.get("bytes_read", 0)), "seconds": elapsed,
                        "memory_gb": s.cold_memory, "cpu_share": node.config.functions.cpu_share(s.cold_memory),
                        "stages": dict(ready.stages)})
            progress.show(f"cold start: {n} experts", advance=1)
    return out


def burst_nodes(config: MeshConfig) -> list[tuple[str, float]]:
    """(name, cpus) of the node daemons a cold-start burst runs on: the config's CPU nodes, as the
    mesh runs them on this host (the default launch.toml: cpu0 and cpu1 of one vCPU each; every
    daemon forks its own functions while all share the cores), else one node of every core."""
    nodes = [(n.name, float(n.cpus)) for n in config.nodes if n.kind == "cpu"]
    return nodes or [("local", float(os.cpu_count() or 1))]


def cold_burst(first: Node, config: MeshConfig, model_path: Path, run_dir: Path, s: Settings,
               experts_per_layer: int, layers: int, memory_gb: float, progress: Progress) -> dict:
    """--cold-burst one-expert functions of `memory_gb` requested at once, as a plan's cold
    replicas are, spread round-robin over the config's CPU nodes (burst_nodes: one daemon each,
    declared with the node's cpus; `first`, the sweep's daemon, is the first of them): per
    instance its node, fork wait ("spawn" stage), billed INIT (limits + weights + ready: the
    meter's) and ready time from the first request; then all are stopped. Each daemon forks its
    own one after another and every INIT shares the host's cores."""
    nodes = burst_nodes(config)
    n = min(s.cold_burst, experts_per_layer * layers)
    progress.show(f"cold start: a burst of {n} functions on {len(nodes)} nodes")
    experts = [[(i // experts_per_layer % layers, i % experts_per_layer)] for i in range(n)]
    with contextlib.ExitStack() as stack:
        daemons = [first]
        for index, (_, cpus) in enumerate(nodes[1:]):
            extra = stack.enter_context(Node(config, model_path, first.config.functions.cfs_period_us, run_dir,
                                             f"burst{index}", cpus=cpus))
            daemons.append(extra)
        for daemon in daemons[1:]:
            daemon.wait_warm()
        started = time.perf_counter()
        ids = [d.request([(e, memory_gb) for e in experts[k::len(daemons)]]) for k, d in enumerate(daemons)]
        readies = [(k, ready, t) for k, d in enumerate(daemons) for ready, t in d.collect(ids[k], started)]
        records = [read_run_record(run_dir, ready.instance_id) for _, ready, _ in readies]
        for k, ready, _ in readies:
            daemons[k].stop(ready.instance_id)
    progress.show("", advance=1)
    init = [sum(v for key, v in ready.stages.items() if key != "spawn") for _, ready, _ in readies]
    f = config.functions
    return {"functions": n, "memory_gb": memory_gb, "cpu_share": f.cpu_share(memory_gb),
            "nodes": [{"name": name, "cpus": cpus, "init_cpus": f.init_capacity(cpus)}
                      for name, cpus in nodes[:len(daemons)]],
            "node": [k for k, _, _ in readies], "cpus": [nodes[k][1] for k, _, _ in readies],
            "bytes": [int(r.get("bytes_read", 0)) for r in records],
            "ready_s": [t for _, _, t in readies], "init_s": init,
            "spawn_wait_s": [float(ready.stages.get("spawn", 0.0)) for _, ready, _ in readies],
            "init_sum_s": float(sum(init)), "last_ready_s": max(t for _, _, t in readies)}


def period_run(node: Node, s: Settings, hidden: int, dtype) -> dict:
    """--period-seconds of back-to-back --period-tokens calls to one --period-memory function at
    the node's CFS period: the round trips (stats and the trace over time) and the throttling."""
    gb_per_vcpu = node.config.functions.gb_per_vcpu
    ready, _ = node.spawn([(0, 0)], s.period_memory)
    rts, computes, at = [], [], []
    with Caller(ready.endpoint, hidden, dtype, node.config) as caller:
        for _ in range(WARMUP_CALLS):
            caller.call(0, 0, s.period_tokens)
        before = cpu_stat(ready)
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < s.period_seconds:
            rt, compute = caller.call(0, 0, s.period_tokens)
            rts.append(rt)
            computes.append(compute)
            at.append(now - start)
        throttled = throttling(before, cpu_stat(ready))
    node.stop(ready.instance_id)
    return {"period_us": node.config.functions.cfs_period_us, "memory_gb": s.period_memory,
            "cpu_share": s.period_memory / gb_per_vcpu, "tokens": s.period_tokens,
            "cgroups": cgroup_state(ready), "throttling": throttled, "calls_per_s": len(rts) / s.period_seconds,
            "round_trip_s": stats(rts), "compute_s": stats(computes),
            "trace": {"at_s": at, "round_trip_s": rts}}
