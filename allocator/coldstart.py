"""When a plan's cold instances are ready, and how long each one's INIT lasts, on shared nodes.

A node daemon has one zygote that forks its workers one after another (nodes/zygote.py), and
every forked worker then runs its INIT (cgroup limits, weight load, ready) while the next ones
fork. Measured on this machine (`moemesh bench --policies`, all-remote: 48 one-expert
functions of 0.325 GB on two 1-vCPU nodes): the 24th fork of a node started 1.2 s after the
first, and INIT, 0.05 s for the first instances (as `moemesh profile` measures one alone),
stretched to 0.3-0.8 s while ten others shared the node; INIT summed over the 48 instances
was 20 s, not 48 x 0.05 s. So cold starts in parallel (Remoe's assumption) under-bill INIT by
an order of magnitude and put the last function's ready time at 0.05 s instead of ~1.6 s.

Model (processor sharing, per node, deterministic):

- Cold replicas are spawned at t = 0 in plan order; a replica without a named node goes to
  the function node with the least memory placed per GB of capacity (the coordinator's
  ``_place``), counting warm instances already there.
- Each cold start needs ``spawn_s`` CPU-seconds of the zygote (the fork; serial: one at a time)
  and then ``init_s = cold_start(bytes) - spawn_s`` CPU-seconds of its own (INIT), both as
  measured alone on a 1 vCPU share by ``moemesh profile``.
- The node's ``cpus`` are shared among the spawn path (while forks are queued; weight
  ``spawn_shares``: the daemon, the zygote and the new child each take a share) and the workers
  in INIT (weight 1 each, at most one CPU: INIT is one thread). The weight is fitted per host
  and model by `moemesh profile` (:func:`fit_spawn_shares`) to a burst of 48 one-expert cold
  starts spread over the config's CPU nodes, a daemon each, as the mesh runs them: 3.75 for the
  bundled model here (mean INIT 300 ms modelled 304, last ready 1.60 s modelled 1.62), 7.5 for
  the Qwen shapes (0.89 s both); 3 where no profile has measured it. The
  function's CPU quota is not applied to INIT: measured, 4- and 8-expert functions of 0.325
  vCPU took 0.09 s of INIT, against 0.05-0.07 s alone at 1 vCPU (the quota would make it
  0.15-0.2 s), and the first one-expert instances of a burst 0.05 s against 0.035 s.

Returns per cold replica its ready time (the fork queue, then INIT) and its INIT seconds (what
the meter bills as INIT: from the worker's first line to ready; the fork is the platform's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from allocator.model import Cluster, WarmInstance
from allocator.plan import Plan


@dataclass(frozen=True)
class ColdReplica:
    """One replica that must cold-start: function index, node, CPU work of fork and INIT."""

    function: int
    node: str
    spawn_s: float
    init_s: float
    cpu_cap: float = 1.0  # CPUs its INIT may use (one thread; see the module docstring)


@dataclass(frozen=True)
class ColdTimeline:
    """ready_s: [replicas] when each is ready; init_s: [replicas] its INIT duration (billed)."""

    replicas: tuple[ColdReplica, ...]
    ready_s: np.ndarray
    init_s: np.ndarray

    def function_ready_s(self, functions: int) -> np.ndarray:
        """[functions] when the first cold replica of each function is ready (0: none cold)."""
        ready = np.full(functions, np.inf)
        for replica, t in zip(self.replicas, self.ready_s):
            ready[replica.function] = min(ready[replica.function], float(t))
        return np.where(np.isinf(ready), 0.0, ready)

    def function_init_s(self, functions: int) -> np.ndarray:
        """[functions] INIT seconds summed over each function's cold replicas."""
        total = np.zeros(functions)
        for replica, t in zip(self.replicas, self.init_s):
            total[replica.function] += float(t)
        return total


def place_cold(
    plan: Plan, cold_replicas: Sequence[int], cluster: Cluster, warm: Sequence[WarmInstance] = ()
) -> list[tuple[int, str]]:
    """(function index, node) of every cold replica, in spawn order (module docstring)."""
    hosts = cluster.function_nodes()
    load = {n.name: 0.0 for n in hosts}
    for instance in warm:
        if instance.node in load:
            load[instance.node] += instance.memory_gb
    placed = []
    for index, (function, missing) in enumerate(zip(plan.functions, cold_replicas)):
        warm_here = function.replicas - missing
        for replica in range(warm_here, function.replicas):
            if function.nodes:
                node = function.nodes[replica]
            else:
                node = min(hosts, key=lambda n: load[n.name] / n.capacity_gb).name
            load[node] = load.get(node, 0.0) + function.memory_gb
            placed.append((index, node))
    return placed


SPAWN_PATH_SHARES = 3.0  # the daemon (cgroup set-up), the zygote (fork), the child before its first line


def _share(cpus: float, weights: list[float], caps: list[float]) -> list[float]:
    """Rates of the active jobs: ``cpus`` shared in proportion to ``weights``, none above its
    cap, what a capped job leaves going to the others (weighted water-filling). Plain floats:
    the estimator runs this inside policy searches, on a few dozen jobs."""
    rates = [0.0] * len(caps)
    open_ = list(range(len(caps)))
    left = float(cpus)
    while open_ and left > 1e-15:
        unit = left / sum(weights[j] for j in open_)
        capped = [j for j in open_ if caps[j] <= unit * weights[j] + 1e-15]
        if not capped:
            for j in open_:
                rates[j] = unit * weights[j]
            break
        for j in capped:
            rates[j] = caps[j]
            left -= caps[j]
        open_ = [j for j in open_ if j not in capped]
    return rates


def simulate_node(
    cpus: float,
    spawn_s: Sequence[float],
    init_s: Sequence[float],
    caps: Sequence[float] | None = None,
    spawn_shares: float = SPAWN_PATH_SHARES,
) -> tuple[np.ndarray, np.ndarray]:
    """One node's cold starts in processor sharing: (ready_s, INIT duration) per replica [n].

    Replica k is forked (``spawn_s[k]`` CPU-seconds) after replica k-1's fork, then needs
    ``init_s[k]`` CPU-seconds of INIT at most ``caps[k]`` CPUs (at most 1: one thread;
    default 1). The node's ``cpus`` are shared among the spawn path, weighted
    ``spawn_shares`` (three processes take part in a fork: the daemon, the zygote and the
    child), and each worker in INIT, weighted 1. Fitted to the all-remote run in the module
    docstring (weight 3: forks 49 ms apart, mean INIT 0.43 s, last ready 1.34 s after the
    first fork; measured 47 ms, 0.42 s, ~1.5 s); weight 1 gives a mean INIT of 0.16 s.
    """
    spawn = [float(v) for v in spawn_s]
    left = [float(v) for v in init_s]
    n = len(spawn)
    cap = [1.0] * n if caps is None else [min(float(c), 1.0) for c in caps]
    if cpus <= 0 or any(c <= 0 for c in cap) or len(left) != n or len(cap) != n:
        raise ValueError(f"simulate_node: need cpus > 0, caps > 0 and equal lengths, got {cpus}, {cap}")
    ready, started = [0.0] * n, [0.0] * n
    forking, fork_left = 0, (spawn[0] if n else 0.0)
    running: list[int] = []
    clock = 0.0
    while forking < n or running:
        jobs = ([-1] if forking < n else []) + running
        rates = _share(cpus, [spawn_shares if j < 0 else 1.0 for j in jobs],
                       [1.0 if j < 0 else cap[j] for j in jobs])
        step = min((fork_left if j < 0 else left[j]) / rate for j, rate in zip(jobs, rates))
        clock += step
        for j, rate in zip(jobs, rates):
            if j < 0:
                fork_left -= rate * step
            else:
                left[j] -= rate * step
        for j in [j for j in running if left[j] <= 1e-12]:
            running.remove(j)
            ready[j] = clock
        if forking < n and fork_left <= 1e-12:
            started[forking] = clock
            if left[forking] <= 1e-12:
                ready[forking] = clock
            else:
                running.append(forking)
            forking += 1
            fork_left = spawn[forking] if forking < n else 0.0
    return np.array(ready), np.array(ready) - np.array(started)


def fit_spawn_shares(nodes: Sequence[tuple[float, Sequence[float]]], spawn_s: float, measured_init_s: float,
                     grid: Sequence[float] = tuple(0.25 * k for k in range(1, 65))) -> float:
    """The spawn-path weight with which :func:`simulate_node` bills a burst's measured INIT.

    A burst of cold starts requested at once on ``nodes``, each ``(cpus, init_s)``: the node's
    CPUs and, per cold start it forks, the INIT it needs alone (as the estimator models it);
    every fork takes ``spawn_s``; the measured INIT summed over the burst is ``measured_init_s``.
    Returns the weight of ``grid`` whose simulated sum is nearest (the sum grows with the
    weight: the forks take CPU from the INITs while they last). `moemesh profile` measures the
    burst on this host (mesh/profiling/measure.py ``cold_burst``), so the contention is
    today's, not a constant."""
    nodes = [(float(cpus), list(init)) for cpus, init in nodes if len(init)]
    if not nodes or measured_init_s <= 0:
        raise ValueError("fit_spawn_shares: need a burst and a measured INIT > 0")

    def error(weight: float) -> float:
        total = sum(float(simulate_node(cpus, [spawn_s] * len(init), init, spawn_shares=weight)[1].sum())
                    for cpus, init in nodes)
        return abs(total - measured_init_s)

    return min(grid, key=error)


def cold_timeline(replicas: Sequence[ColdReplica], cluster: Cluster,
                  spawn_shares: float = SPAWN_PATH_SHARES) -> ColdTimeline:
    """Ready time and INIT of every cold replica, each node simulated on its own
    (``spawn_shares``: the spawn path's CPU weight, Profiles.spawn_shares)."""
    ready = np.zeros(len(replicas))
    init = np.zeros(len(replicas))
    by_node: dict[str, list[int]] = {}
    for index, replica in enumerate(replicas):
        by_node.setdefault(replica.node, []).append(index)
    for node, members in by_node.items():
        cpus = float(cluster.node(node).cpus)
        r, i = simulate_node(
            cpus,
            [replicas[m].spawn_s for m in members],
            [replicas[m].init_s for m in members],
            [replicas[m].cpu_cap for m in members],
            spawn_shares,
        )
        ready[members], init[members] = r, i
    return ColdTimeline(tuple(replicas), ready, init)
