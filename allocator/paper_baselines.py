"""The three papers' baselines as policies on the same machinery (PAPERS.md 1.6, 2.5, 3.2).

Each is ``name(forecast, profiles, slo, cluster, workload, *, warm=(), **options) -> Plan``,
like every policy (allocator/model.py); ``POLICIES`` maps the names ``policy.name`` takes.
Our readings, where the papers leave room, are marked [D].

Remoe's system baselines (PAPERS.md 1.6; MIX is ``allocator.baselines.mix``):

- ``cpu-only``: the main model on a CPU function and every expert in CPU functions, one per
  MoE layer holding all of that layer's experts (Remoe's remote-function layout with every
  expert remote and no sizing search), each at least one vCPU's memory [D: the brief's reading
  of "CPU-only": the model computed on CPUs only, with the experts serverless].
- ``gpu-only``: everything resident in one GPU-priced main function (``c_g = 3 c_c`` by the
  default prices), experts computed on the main device. On a CPU main node it is all-local.
- ``fetch``: ideal offloading: every expert resident in the main function's host memory,
  prefetched to the device perfectly (no swap time); billed as resident memory, experts at
  the CPU price beside a GPU-priced non-expert part (Remoe's ``c_g M_g + c_c m_w`` with every
  expert in ``m_w``). [D] The estimator times local experts either on the CPU share or on the
  device at the device's price (allocator/cost.py); we keep the price honest, so on a GPU main
  node its *estimated* expert time is the CPU one (pessimistic: the paper's Fetch has zero
  swap time); on a CPU main node all three readings coincide.

Liu et al.'s baselines (PAPERS.md 2.5):

- ``lambdaml``: every expert its own function at LambdaML's 3008 MB (rounded up to the memory
  grid), no prediction, no replicas.
- ``cpu-cluster``: serverful, always on: every expert resident in a CPU main function; billed
  ``price_per_hour x wall time`` for the cluster, whatever the load (``params["serverful"]``;
  the price is ``[billing] serverful_price_per_hour``, its source stated in mesh/config.py).
  The meter's per-GB-s figure for it is the same plan priced serverlessly; compare reports both.

MoEless's baselines (PAPERS.md 3.2):

- ``static-ep``: static expert parallelism (Megatron-style): one function per expert,
  experts of each layer split into contiguous blocks over the expert nodes (expert e of K on
  node ``e * n // K``), no replicas, fixed whatever the load. Nodes and sizes as
  ``allocator.moeless`` chooses them (GPU nodes, weight-sized, when they hold every expert;
  else the non-main nodes at one vCPU's memory).
- ``eplb``: DeepSeek EPLB from load history: per layer, ``redundancy x K`` extra replicas
  (rounded up) go one at a time to ``argmax load / replicas`` (``replicate_by_load`` with a
  fixed slot count), then the physical replicas are packed onto the nodes heaviest first into
  the lightest node with a free slot (``balanced_packing``, equal slot counts per node).
  "Periodic, from history" is how it is run: with a history predictor (moving-average) and
  ``policy.replan_every`` as the period; the policy itself is the pure re-placement.
- ``capacity-factor``: the static-ep layout with ``Plan.capacity_factor`` (default 1.25, the
  Switch Transformer's training value): rows above an expert's capacity are dropped
  (allocator/capacity.py), the one baseline that changes tokens.
- ``oracle``: plans from the true activations: MoEless's scaling and placement (or ``inner``,
  any allocator policy) on the forecast it is given, which is the truth when the predictor is
  the oracle (``predictor.name = "oracle"`` with the workload's traces);
  ``params["forecast_is_truth"]`` records whether it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from allocator import baselines, moeless
from allocator.cost import annotate
from allocator.model import SLO, Cluster, Node, WarmInstance, Workload
from allocator.packing import replicate_by_load
from allocator.plan import Expert, FunctionSpec, MainSpec, Plan
from allocator.profiles import Profiles
from allocator.sizing import check_inputs, forecast_summary, function_required_gb, main_memory_gb
from predictor.forecast import Forecast

LAMBDAML_MEMORY_MB = 3008  # LambdaML's fixed function size (Lambda's maximum then), PAPERS.md 2.5
SWITCH_CAPACITY_FACTOR = 1.25
EPLB_REDUNDANCY = 0.25  # extra physical replicas per layer, as a share of its experts [D]
# AWS EC2 m6a.32xlarge on-demand, Linux, us-east-1: 128 vCPU (3rd-gen AMD EPYC), 512 GiB, as
# Liu et al.'s 2 x 64-core EPYC, 512 GB cluster; the launch config's default says the same.
CPU_CLUSTER_PRICE_PER_HOUR = 5.5296


def _every_expert(profiles: Profiles) -> list[Expert]:
    s = profiles.shape
    return [(layer, e) for layer in range(s.moe_layers) for e in range(s.experts_per_layer)]


def _finish(plan: Plan, forecast, profiles, cluster, workload, warm) -> Plan:
    plan.validate(profiles.shape.moe_layers, profiles.shape.experts_per_layer)
    return annotate(plan, forecast, profiles, cluster, workload, warm=warm)


def _record(forecast: Forecast, slo: SLO, reason: str, **more) -> dict:
    return {"forecast": forecast_summary(forecast), "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "reason": reason, **more}


def _resident(name: str, device: str, experts_device: str, reason: str, forecast, profiles, slo, cluster,
              workload, warm, **more) -> Plan:
    check_inputs(forecast, profiles, workload)
    local = _every_expert(profiles)
    main = MainSpec(main_memory_gb(len(local), profiles, cluster, workload), device)
    params = _record(forecast, slo, reason, local_experts_device=experts_device, **more)
    return _finish(Plan(name, main, frozenset(local), (), params=params), forecast, profiles, cluster, workload, warm)


# ------------------------------------------------------------------------------ Remoe


def cpu_only(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
             warm: Sequence[WarmInstance] = ()) -> Plan:
    """Remoe CPU-only: a CPU main, every expert in one CPU function per layer (>= 1 vCPU)."""
    check_inputs(forecast, profiles, workload)
    shape, grid = profiles.shape, cluster.grid
    functions = []
    for layer in range(shape.moe_layers):
        experts = tuple((layer, e) for e in range(shape.experts_per_layer))
        need = function_required_gb(experts, profiles, workload)
        if need > grid.maximum_gb:
            raise ValueError(f"cpu-only: layer {layer}'s experts need {need:.2f} GB > the {grid.maximum_gb} GB "
                             "function ceiling ([functions] max_memory_gb)")
        size = grid.round_up(max(need, cluster.prices.gb_per_vcpu))
        functions.append(FunctionSpec(f"L{layer}-all", experts, size))
    main = MainSpec(main_memory_gb(0, profiles, cluster, workload), "cpu")
    params = _record(forecast, slo, "Remoe CPU-only: CPU main, every expert in a CPU function per layer",
                     local_experts_device="cpu")
    plan = Plan("cpu-only", main, frozenset(), tuple(functions), params=params)
    return _finish(plan, forecast, profiles, cluster, workload, warm)


def gpu_only(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
             warm: Sequence[WarmInstance] = ()) -> Plan:
    """Remoe GPU-only: every expert resident in a GPU-priced main function, computed there."""
    return _resident("gpu-only", "gpu", "main", "Remoe GPU-only: everything in one GPU-priced main function",
                     forecast, profiles, slo, cluster, workload, warm)


def fetch(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
          warm: Sequence[WarmInstance] = ()) -> Plan:
    """Remoe Fetch: every expert resident in host memory, ideal prefetch (module docstring)."""
    return _resident("fetch", cluster.main.kind, "cpu",
                     "Remoe Fetch: ideal offloading, every expert resident in host memory, no swap time",
                     forecast, profiles, slo, cluster, workload, warm, swap_s=0.0)


# ------------------------------------------------------------------------------ Liu et al.


def lambdaml(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
             warm: Sequence[WarmInstance] = (), memory_mb: int = LAMBDAML_MEMORY_MB) -> Plan:
    """LambdaML: one function per expert at 3008 MB (grid-rounded up), no prediction, no replicas."""
    plan = baselines.all_remote(forecast, profiles, slo, cluster, workload, warm=warm,
                                memory_gb=memory_mb / 1024)
    params = {**plan.params, "reason": f"LambdaML: every expert its own {memory_mb} MB function, no replicas",
              "requested_memory_mb": memory_mb}
    return replace(plan, policy="lambdaml", params=params)


def cpu_cluster(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
                warm: Sequence[WarmInstance] = (), price_per_hour: float = CPU_CLUSTER_PRICE_PER_HOUR) -> Plan:
    """Liu et al.'s always-on CPU cluster: serverful, billed price_per_hour x wall time."""
    if not price_per_hour > 0:
        raise ValueError(f"cpu-cluster: price_per_hour must be > 0, got {price_per_hour}")
    return _resident("cpu-cluster", "cpu", "main", "serverful CPU cluster: always on, hourly price x wall time",
                     forecast, profiles, slo, cluster, workload, warm,
                     serverful={"price_per_hour": price_per_hour, "cost_per_s": price_per_hour / 3600.0})


# ------------------------------------------------------------------------------ MoEless


def _expert_nodes(profiles: Profiles, cluster: Cluster, main: MainSpec, workload: Workload
                  ) -> tuple[list[Node], float]:
    """(nodes, function size) for one-function-per-expert layouts, as allocator.moeless picks them:
    GPU nodes at the weights' size when they hold every expert, else the non-main nodes (all
    nodes when the main is the only one) at one vCPU's memory."""
    shape, grid = profiles.shape, cluster.grid
    need = function_required_gb([(0, 0)], profiles, workload)
    count = shape.moe_layers * shape.experts_per_layer

    def free(node: Node) -> float:
        return node.capacity_gb - (main.memory_gb if node.name == cluster.main_node else 0.0)

    gpus = [n for n in cluster.nodes if n.kind == "gpu"]
    if gpus and sum(free(n) for n in gpus) >= count * grid.round_up(need):
        return gpus, grid.round_up(need)
    others = [n for n in cluster.nodes if n.name != cluster.main_node] or list(cluster.nodes)
    return others, grid.round_up(max(need, cluster.prices.gb_per_vcpu))


def _check_capacity(name: str, functions: Sequence[FunctionSpec], cluster: Cluster, main: MainSpec) -> None:
    used: dict[str, float] = {cluster.main_node: main.memory_gb}
    for f in functions:
        for node in f.nodes:
            used[node] = used.get(node, 0.0) + f.memory_gb
    for node, gb in used.items():
        if gb > cluster.node(node).capacity_gb + 1e-9:
            raise ValueError(f"{name}: {gb:.2f} GB of functions on node {node} > its "
                             f"{cluster.node(node).capacity_gb} GB; raise [[nodes]] capacity_gb")


def _layer_loads(forecast: Forecast, workload: Workload, top_k: int) -> np.ndarray:
    """[layers, experts] expected token-slots of the request (distribution x tokens x top_k)."""
    return np.asarray(forecast.distribution, dtype=float) * workload.total_tokens * top_k


def static_ep(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
              warm: Sequence[WarmInstance] = (), capacity_factor: float = 0.0,
              name: str = "static-ep") -> Plan:
    """Static expert parallelism: one function per expert, contiguous blocks per node, fixed."""
    check_inputs(forecast, profiles, workload)
    shape = profiles.shape
    main = MainSpec(main_memory_gb(0, profiles, cluster, workload), cluster.main.kind)
    nodes, size = _expert_nodes(profiles, cluster, main, workload)
    k = shape.experts_per_layer
    functions = tuple(
        FunctionSpec(f"L{layer}-E{e}", ((layer, e),), size, 1, (nodes[e * len(nodes) // k].name,))
        for layer in range(shape.moe_layers) for e in range(k)
    )
    _check_capacity(name, functions, cluster, main)
    reason = "MoEless baseline: static expert parallelism, experts in contiguous blocks over the nodes"
    if capacity_factor > 0:
        reason = f"MoEless baseline: static EP with capacity-factor {capacity_factor:g} token dropping"
    params = _record(forecast, slo, reason, function_memory_gb=size, nodes=[n.name for n in nodes],
                     capacity_factor=capacity_factor)
    plan = Plan(name, main, frozenset(), functions, params=params, capacity_factor=capacity_factor)
    return _finish(plan, forecast, profiles, cluster, workload, warm)


def capacity_factor_policy(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster,
                           workload: Workload, *, warm: Sequence[WarmInstance] = (),
                           capacity_factor: float = SWITCH_CAPACITY_FACTOR) -> Plan:
    """Static EP with capacity-factor token dropping (``Plan.capacity_factor``)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity-factor: capacity_factor must be > 0, got {capacity_factor}")
    return static_ep(forecast, profiles, slo, cluster, workload, warm=warm, capacity_factor=capacity_factor,
                     name="capacity-factor")


def balanced_packing(weights, packs: int) -> np.ndarray:
    """DeepSeek EPLB's balanced packing: items heaviest first into the lightest pack that has a
    free slot, every pack holding at most ``ceil(items / packs)`` items.

    weights: [items] >= 0; returns pack index [items] int in [0, packs).
    """
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("balanced_packing: weights must be a 1-D array of finite values >= 0")
    if packs < 1:
        raise ValueError(f"balanced_packing: packs must be >= 1, got {packs}")
    slots = math.ceil(w.size / packs) if w.size else 0
    load, count = np.zeros(packs), np.zeros(packs, dtype=int)
    pack = np.empty(w.size, dtype=int)
    for item in np.argsort(-w, kind="stable"):
        open_packs = np.flatnonzero(count < slots)
        chosen = int(open_packs[np.argmin(load[open_packs])])  # ties: lower index
        pack[item] = chosen
        load[chosen] += w[item]
        count[chosen] += 1
    return pack


def eplb(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
         warm: Sequence[WarmInstance] = (), redundancy: float = EPLB_REDUNDANCY) -> Plan:
    """EPLB re-placement from the load history in ``forecast``: hottest experts replicated into
    ``ceil(redundancy * K)`` extra slots per layer, replicas balanced over the nodes."""
    check_inputs(forecast, profiles, workload)
    if redundancy < 0:
        raise ValueError(f"eplb: redundancy must be >= 0, got {redundancy}")
    shape = profiles.shape
    layers, k = shape.moe_layers, shape.experts_per_layer
    main = MainSpec(main_memory_gb(0, profiles, cluster, workload), cluster.main.kind)
    nodes, size = _expert_nodes(profiles, cluster, main, workload)
    loads = _layer_loads(forecast, workload, shape.top_k)  # [layers, experts]
    extra = math.ceil(redundancy * k)
    functions = []
    replicas_per_layer = []
    node_load = np.zeros(len(nodes))
    for layer in range(layers):
        replicas = replicate_by_load(loads[layer], tolerance=None, total_replicas=k + extra)  # [experts]
        logical = np.repeat(np.arange(k), replicas)  # physical replica -> logical expert
        per_replica = loads[layer][logical] / replicas[logical]  # [physical]
        pack = balanced_packing(per_replica, len(nodes))
        node_load += np.bincount(pack, per_replica, len(nodes))
        for e in range(k):
            where = tuple(nodes[p].name for p in pack[logical == e])
            functions.append(FunctionSpec(f"L{layer}-E{e}", ((layer, e),), size, int(replicas[e]), where))
        replicas_per_layer.append(replicas.tolist())
    _check_capacity("eplb", functions, cluster, main)
    params = _record(forecast, slo, "DeepSeek EPLB: hottest experts replicated from load history, "
                     "replicas balanced over the nodes", function_memory_gb=size, nodes=[n.name for n in nodes],
                     redundant_per_layer=extra, replicas=replicas_per_layer,
                     node_load={n.name: round(float(v), 4) for n, v in zip(nodes, node_load)})
    plan = Plan("eplb", main, frozenset(), tuple(functions), params=params)
    return _finish(plan, forecast, profiles, cluster, workload, warm)


def oracle(forecast: Forecast, profiles: Profiles, slo: SLO, cluster: Cluster, workload: Workload, *,
           warm: Sequence[WarmInstance] = (), inner: str = "moeless") -> Plan:
    """``inner``'s plan (default MoEless) from the forecast, named "oracle"; the forecast is the
    truth when it comes from the oracle predictor (``params["forecast_is_truth"]``)."""
    if inner == "moeless":
        plan = moeless.plan(forecast, profiles, slo, cluster, workload, warm=warm)
    else:
        import allocator

        if inner not in allocator.POLICIES:
            raise ValueError(f"oracle: unknown inner policy {inner!r}; known: {sorted(allocator.POLICIES)}")
        plan = allocator.make_plan(inner, forecast, profiles, slo, cluster, workload, warm=warm)
    truth = forecast.source == "oracle"
    reason = f"oracle: {inner} planned from the true activations" if truth else \
        f"oracle: {inner} planned from a {forecast.source or 'unnamed'} forecast (not the truth: run with " \
        "predictor.name = \"oracle\")"
    return replace(plan, policy="oracle", params={**plan.params, "inner": inner, "forecast_is_truth": truth,
                                                    "reason": reason})


POLICIES = {
    "cpu-only": cpu_only,
    "gpu-only": gpu_only,
    "fetch": fetch,
    "lambdaml": lambdaml,
    "cpu-cluster": cpu_cluster,
    "static-ep": static_ep,
    "eplb": eplb,
    "capacity-factor": capacity_factor_policy,
    "oracle": oracle,
}

# Which paper each baseline comes from (for tables).
PAPER_OF = {"cpu-only": "Remoe", "gpu-only": "Remoe", "fetch": "Remoe", "mix": "Remoe", "lambdaml": "Liu et al.",
            "cpu-cluster": "Liu et al.", "static-ep": "MoEless", "eplb": "MoEless", "capacity-factor": "MoEless",
            "oracle": "all three"}

__all__ = ["POLICIES", "PAPER_OF", "balanced_packing", "capacity_factor_policy", "cpu_cluster",
           "cpu_only", "eplb", "fetch", "gpu_only", "lambdaml", "oracle", "static_ep"]
