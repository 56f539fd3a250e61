"""When a plan's cold instances are ready, and how long each one's INIT lasts, on shared nodes.

A node daemon has one zygote that forks its workers one after another (nodes/zygote.py), and
every forked worker then runs its INIT (cgroup limits, weight load, ready). Measured on this
machine (48 one-expert functions of 0.25-0.33 GB requested at once on two 1-vCPU nodes): forked
as fast as the zygote could, the INITs shared the node, each took 0.3-0.7 s on average (0.035 s
alone) and the burst billed 15-30 s of INIT, 2x apart from one burst to the next. So the daemon
gates them (nodes/init_gate.py): a cold start is forked only once its CPU share fits in the
node's vCPUs beside those still in fork or INIT; INIT then takes about its time alone at its
own quota (the worker joins its cgroup before it loads: 0.09-0.15 s at a quarter of a vCPU,
0.09-0.12 s at a third), the burst bills 3-4x less and the last one is ready as soon (1.3-1.6 s).

Model (processor sharing, per node, deterministic):

- Cold replicas are spawned at t = 0 in plan order; a replica without a named node goes to
  the function node with the least memory placed per GB of capacity (the coordinator's
  ``_place``), counting warm instances already there.
- Each cold start needs ``spawn_s`` CPU-seconds of the zygote (the fork; serial: one at a
  time), which starts only when its CPU cap fits in the node's ``init_cpus`` beside the caps
  of those in fork or INIT (the gate; one alone always fits), and then its INIT: first
  ``init_fixed_s`` seconds that use no CPU of the node (joining its cgroup, the "limits" stage:
  6-21 ms whatever the quota), then ``init_s = cold_start(bytes) - spawn_s - init_fixed_s``
  CPU-seconds (loading its weights, binding its socket), all as measured alone by ``moemesh
  profile`` and brought to a full vCPU, at most its CPU share (``cpu_cap``: its quota; at most
  one CPU, INIT is one thread). Measured alone, one expert: weights 18 ms at 1 vCPU, 30 ms at
  0.5, 135 ms at 0.125 (the quota's 1/share), limits 12 ms at each. Taken whole as CPU work
  at the quota (and keyed on the bytes read, half those served for the bundled bf16 checkpoint),
  the INIT of a 48-function plan's 0.33 GB functions was estimated at 1.8x the meter's.
- The node's ``cpus`` are shared among the spawn path (while a fork runs; weight
  ``spawn_shares``: the daemon, the zygote and the new child each take a share) and the
  workers in INIT (weight 1 each). The weight is fitted per host and model by `moemesh
  profile` (:func:`fit_spawn_shares`) to a burst of 48 one-expert cold starts spread over the
  config's CPU nodes, a daemon each, as the mesh runs them (bundled model here: 1.25, mean INIT
  modelled 0.176 s against 0.176 measured, last ready 1.81 s against 1.83); 3 where no profile
  has measured it.

Returns per cold replica its ready time (the gate and fork queue, then INIT) and its INIT
seconds (what the meter bills as INIT: from the worker's first line to ready; the queue and
the fork are the platform's).
"""

from __future__ import annotations

import math
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
    cpu_cap: float = 1.0  # CPUs its INIT may use: its CPU share, at most one (module docstring)
    fixed_s: float = 0.0  # INIT's first part, no CPU: joining its cgroup (Profiles.init_fixed_s)


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
    gate_cpus: float = math.inf,
    fixed_s: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One node's cold starts in processor sharing: (ready_s, INIT duration) per replica [n].

    Replica k is forked (``spawn_s[k]`` CPU-seconds) after replica k-1's fork, and only once
    its CPU cap fits in ``gate_cpus`` beside the caps of the replicas still in fork or INIT (the
    daemon's init gate, nodes/init_gate.py; one alone always fits; inf: no gate). Its INIT is
    first ``fixed_s[k]`` seconds that take no CPU of the node (joining its cgroup; default 0),
    then ``init_s[k]`` CPU-seconds at most ``caps[k]`` CPUs (its CPU share, at most 1: one
    thread at its cgroup's quota; default 1). The node's ``cpus`` are shared among the spawn
    path, weighted ``spawn_shares`` (three processes take part in a fork: the daemon, the
    zygote and the child), and each worker in INIT's CPU part, weighted 1.
    """
    spawn = [float(v) for v in spawn_s]
    left = [float(v) for v in init_s]
    n = len(spawn)
    cap = [1.0] * n if caps is None else [min(float(c), 1.0) for c in caps]
    delay = [0.0] * n if fixed_s is None else [float(v) for v in fixed_s]
    if (cpus <= 0 or gate_cpus <= 0 or any(c <= 0 for c in cap) or any(d < 0 for d in delay)
            or len(left) != n or len(cap) != n or len(delay) != n):
        raise ValueError(f"simulate_node: need cpus, gate_cpus and caps > 0, fixed_s >= 0 and equal "
                         f"lengths, got {cpus}, {gate_cpus}, {cap}, {delay}")
    ready, started = [0.0] * n, [0.0] * n
    nxt, forking, fork_left = 0, -1, 0.0  # next replica to admit; the one in fork (-1: none)
    running: list[int] = []  # in INIT's CPU part
    waiting: dict[int, float] = {}  # in INIT's fixed part: seconds left
    held = 0.0  # caps of the replicas in fork or INIT
    clock = 0.0

    def finish(j: int) -> None:
        nonlocal held
        ready[j] = clock
        held -= cap[j]

    while nxt < n or forking >= 0 or running or waiting:
        if forking < 0 and nxt < n and (held == 0.0 or held + cap[nxt] <= gate_cpus + 1e-9):
            forking, fork_left, nxt = nxt, spawn[nxt], nxt + 1
            held += cap[forking]
        if forking >= 0 and fork_left <= 1e-12:  # a fork of no work: at once
            step = 0.0
        else:
            jobs = ([-1] if forking >= 0 else []) + running
            rates = _share(cpus, [spawn_shares if j < 0 else 1.0 for j in jobs],
                           [1.0 if j < 0 else cap[j] for j in jobs]) if jobs else []
            step = min([(fork_left if j < 0 else left[j]) / rate for j, rate in zip(jobs, rates)]
                       + list(waiting.values()))
            clock += step
            for j, rate in zip(jobs, rates):
                if j < 0:
                    fork_left -= rate * step
                else:
                    left[j] -= rate * step
            for j in waiting:
                waiting[j] -= step
        for j in [j for j in running if left[j] <= 1e-12]:
            running.remove(j)
            finish(j)
        for j in [j for j, t in waiting.items() if t <= 1e-12]:
            del waiting[j]
            if left[j] <= 1e-12:
                finish(j)
            else:
                running.append(j)
        if forking >= 0 and fork_left <= 1e-12:
            started[forking] = clock
            if delay[forking] > 1e-12:
                waiting[forking] = delay[forking]
            elif left[forking] <= 1e-12:
                finish(forking)
            else:
                running.append(forking)
            forking = -1
        held = max(held, 0.0) if running or waiting or forking >= 0 else 0.0
    return np.array(ready), np.array(ready) - np.array(started)


def fit_spawn_shares(nodes: Sequence[tuple], spawn_s: float, measured_init_s: float,
                     grid: Sequence[float] = tuple(0.25 * k for k in range(1, 65)),
                     fixed_s: float = 0.0) -> float:
    """The spawn-path weight with which :func:`simulate_node` bills a burst's measured INIT.

    A burst of cold starts requested at once on ``nodes``, each ``(cpus, init_s)`` or
    ``(cpus, init_s, caps, gate_cpus)``: the node's CPUs, per cold start it forks the INIT it
    needs alone (as the estimator models it), their CPU caps and the node's init gate (default
    1 each and no gate); every fork takes ``spawn_s`` and every INIT starts with ``fixed_s``
    seconds of no CPU (Profiles.init_fixed_s); the measured INIT summed over the burst
    is ``measured_init_s``. Returns the weight of ``grid`` whose simulated sum is nearest (the
    sum grows with the weight: the forks take CPU from the INITs while they last). `moemesh
    profile` measures the burst on this host (mesh/profiling/measure.py ``cold_burst``), so the
    contention is today's, not a constant."""
    nodes = [(float(n[0]), list(n[1]), list(n[2]) if len(n) > 2 else None,
              float(n[3]) if len(n) > 3 else math.inf) for n in nodes if len(n[1])]
    if not nodes or measured_init_s <= 0:
        raise ValueError("fit_spawn_shares: need a burst and a measured INIT > 0")

    def error(weight: float) -> float:
        total = sum(float(simulate_node(cpus, [spawn_s] * len(init), init, caps, weight, gate,
                                        [fixed_s] * len(init))[1].sum())
                    for cpus, init, caps, gate in nodes)
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
        host = cluster.node(node)
        r, i = simulate_node(
            float(host.cpus),
            [replicas[m].spawn_s for m in members],
            [replicas[m].init_s for m in members],
            [replicas[m].cpu_cap for m in members],
            spawn_shares,
            host.init_cpus if host.init_cpus is not None else math.inf,
            [replicas[m].fixed_s for m in members],
        )
        ready[members], init[members] = r, i
    return ColdTimeline(tuple(replicas), ready, init)
