"""MoEless-style scaling and placement (arXiv 2603.06350; PAPERS.md 3.2, a [D] reconstruction
from the abstract: the paper's equations were not available).

Entry point: :func:`plan`. Every expert is its own function (expert parallelism as
functions); the main function keeps only the non-expert parts. Then:

1. **Stragglers**: the forecast's ``stragglers`` plus every expert whose expected load exceeds
   ``straggler_threshold`` (1.5) x its layer's mean.
2. **Scaling**: ``allocator.packing.replicate_by_load`` per layer, EPLB-style (next replica to
   argmax load / replicas) for stragglers only, until the largest per-replica load is
   <= ``tolerance`` (1.1) x the layer's mean expert load, ``max_replicas`` is hit, or memory
   runs out. Layers are served most-imbalanced first from one shared memory budget.
3. **Placement**: ``allocator.packing.place_on_nodes``: a replica goes where a warm instance
   of it already runs (locality: no weight load) if that keeps the node's load within
   ``mean + max item``, else to the least-loaded node with free memory (balanced packing).

Functions run on GPU nodes, sized to their weights, when the GPU nodes can hold one instance
of every expert (MoEless serves experts on GPUs); else on the nodes that host functions
(``Cluster.function_nodes``: not the main function's host, which runs no node daemon) with
``cpu_memory_gb`` each (default one vCPU's worth, so CPU instances are not starved), or the
largest grid size that fits one instance of every expert there [D]. Placing them on the main
node (as before) made a plan the mesh could not run: on the bundled model 48 x 1.025 GB on
two 8 GB nodes, so 21 functions never started, 1,107 chunks fell back to the main function
and the estimate billed 7.3x what the meter did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from allocator.cost import annotate
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.packing import place_on_nodes, replicate_by_load
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import Profiles
from allocator.sizing import check_inputs, forecast_summary, function_required_gb, main_memory_gb
from predictor.forecast import Forecast


def _slots(free_gb: np.ndarray, size_gb: float) -> int:
    """Instances of ``size_gb`` the nodes hold, whole instances per node."""
    return int(np.floor(free_gb / size_gb + 1e-9).sum())


def plan(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    straggler_threshold: float = 1.5,
    tolerance: float = 1.1,
    max_replicas: int = 8,
    cpu_memory_gb: float | None = None,
) -> Plan:
    """MoEless: one function per expert, stragglers replicated, replicas placed (module docstring)."""
    check_inputs(forecast, profiles, workload)
    if straggler_threshold <= 0 or tolerance < 1 or max_replicas < 1:
        raise ValueError("moeless: need straggler_threshold > 0, tolerance >= 1, max_replicas >= 1")
    shape, grid = profiles.shape, cluster.grid
    layers, experts = shape.moe_layers, shape.experts_per_layer
    main = MainSpec(main_memory_gb(0, profiles, cluster, workload), cluster.main.kind)
    need = function_required_gb([(0, 0)], profiles, workload)
    cpu_size = grid.round_up(
        max(need, cluster.prices.gb_per_vcpu if cpu_memory_gb is None else cpu_memory_gb)
    )

    def free_on(chosen) -> np.ndarray:
        return np.array(
            [
                n.capacity_gb - (main.memory_gb if n.name == cluster.main_node else 0.0)
                for n in chosen
            ]
        )

    gpu_nodes = [n for n in cluster.nodes if n.kind == "gpu"]
    if gpu_nodes and free_on(gpu_nodes).sum() >= layers * experts * grid.round_up(need):
        nodes, size = gpu_nodes, grid.round_up(need)
    else:  # no GPUs, or too little GPU memory: the function nodes, CPU-sized, smaller if need be
        nodes = list(cluster.function_nodes())
        fitting = [
            gb
            for gb in grid.points(cpu_size)[::-1]
            if gb >= need - 1e-9 and _slots(free_on(nodes), gb) >= layers * experts
        ]
        size = float(fitting[0]) if fitting else cpu_size
    free = free_on(nodes)
    budget = (_slots(free, size) - layers * experts) * size  # whole instances per node
    if budget < 0:
        raise ValueError(
            f"moeless: {layers * experts} functions of {size} GB exceed the nodes' {free.sum():.1f} GB"
        )

    loads = (
        np.asarray(forecast.distribution, dtype=float) * workload.total_tokens * shape.top_k
    )  # [layers, experts]
    mean = loads.mean(axis=1, keepdims=True)
    straggler = loads > straggler_threshold * mean
    for layer, e in forecast.stragglers:
        if 0 <= layer < layers and 0 <= e < experts:
            straggler[layer, e] = True
    replicas = np.ones((layers, experts), dtype=int)
    imbalance = loads.max(axis=1) / np.maximum(mean[:, 0], 1e-12)
    for layer in np.argsort(-imbalance, kind="stable"):
        replicas[layer] = replicate_by_load(
            loads[layer],
            tolerance=tolerance,
            eligible=straggler[layer],
            max_replicas_per_item=max_replicas,
            memory_per_replica=size,
            memory_budget=budget,
        )
        budget -= float((replicas[layer] - 1).sum()) * size

    # One placement item per replica; locality: a warm single-expert instance of the same size.
    items = [
        (layer, e, r)
        for layer in range(layers)
        for e in range(experts)
        for r in range(replicas[layer, e])
    ]
    node_index = {n.name: i for i, n in enumerate(nodes)}
    unused = list(warm)
    preferred = []
    for layer, e, _ in items:
        match = next(
            (
                i
                for i, w in enumerate(unused)
                if w.experts == {(layer, e)}
                and abs(w.memory_gb - size) < 1e-9
                and w.node in node_index
            ),
            None,
        )
        preferred.append(-1 if match is None else node_index[unused.pop(match).node])
    item_loads = np.array([loads[layer, e] / replicas[layer, e] for layer, e, _ in items])
    placement = place_on_nodes(item_loads, np.full(len(items), size), free, np.array(preferred))
    where: dict[tuple[int, int], list[str]] = {}
    for (layer, e, _), node in zip(items, placement):
        where.setdefault((layer, e), []).append(nodes[node].name)
    functions = [
        FunctionSpec(
            f"L{layer}-E{e}", ((layer, e),), size, int(replicas[layer, e]), tuple(where[(layer, e)])
        )
        for layer in range(layers)
        for e in range(experts)
    ]
    node_load = np.bincount(placement, item_loads, len(nodes))
    after = (loads / replicas).max(axis=1) / np.maximum(mean[:, 0], 1e-12)
    params = {
        "forecast": forecast_summary(forecast),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "function_memory_gb": size,
        "stragglers": [[int(a), int(b)] for a, b in zip(*np.nonzero(straggler))],
        "replicas_added": int((replicas - 1).sum()),
        "max_over_mean_before": [round(float(v), 4) for v in imbalance],
        "max_over_mean_after": [round(float(v), 4) for v in after],
        "node_load": {nodes[i].name: round(float(v), 4) for i, v in enumerate(node_load)},
        "node_load_bound": round(float(item_loads.sum() / len(nodes) + item_loads.max()), 4),
        "warm_hits": int(sum(int(p) == int(q) for p, q in zip(preferred, placement))),
    }
    result = Plan("moeless", main, frozenset(), tuple(functions), params=params)
    result.validate(layers, experts)
    return annotate(result, forecast, profiles, cluster, workload, warm=warm)
