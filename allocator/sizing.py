"""Memory every function and the main model need, and checks shared by all policies.

Function memory (Remoe eq. constraints, PAPERS.md 1.3: ``m(y) >= sum_k mu(e_k) + D * Npre_k``):
weights of its experts + an activation buffer + the worker runtime. The buffer is bounded,
not forecast, so a wrong forecast cannot overflow it: a call carries at most the prompt's
N_in tokens per expert, in and out, for at most ``min(top_k, experts of one layer in it)``
experts at once (a token meets at most top_k experts of a layer):
``2 * D * N_in * min(top_k, max experts per layer)`` bytes.

Main memory (Remoe ``M_g``): non-expert weights + ``(N_in + N_out) * (KV bytes + D)`` + local
experts' weights + the runtime.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from allocator.model import BYTES_PER_GB, Cluster, Workload
from allocator.plan import Expert, Plan
from allocator.profiles import Profiles
from predictor.forecast import Forecast


def function_required_gb(
    experts: Iterable[Expert], profiles: Profiles, workload: Workload
) -> float:
    """Smallest memory (GB, before grid rounding) a function serving ``experts`` needs."""
    per_layer = Counter(layer for layer, _ in experts)
    if not per_layer:
        raise ValueError("function_required_gb: no experts")
    shape = profiles.shape
    weights = sum(per_layer.values()) * shape.bytes_per_expert
    buffer = (
        2
        * shape.activation_bytes
        * workload.prompt_tokens
        * min(shape.top_k, max(per_layer.values()))
    )
    return (weights + buffer) / BYTES_PER_GB + profiles.runtime_gb


def experts_fitting(memory_gb: float, profiles: Profiles, workload: Workload) -> int:
    """How many experts of one layer fit in a function of ``memory_gb`` (0 if none)."""
    shape = profiles.shape
    free = (memory_gb - profiles.runtime_gb) * BYTES_PER_GB * (1 + 1e-12)
    per_slot = (
        2 * shape.activation_bytes * workload.prompt_tokens
    )  # buffer per concurrently served expert
    count = 0
    for candidate in range(1, shape.experts_per_layer + 1):
        if candidate >= shape.top_k:  # the buffer stops growing: solve for the rest at once
            fitting = int((free - shape.top_k * per_slot) // shape.bytes_per_expert)
            return (
                max(count, min(fitting, shape.experts_per_layer)) if fitting >= candidate else count
            )
        if candidate * (shape.bytes_per_expert + per_slot) > free:
            return count
        count = candidate
    return count


def main_required_gb(local_experts: int, profiles: Profiles, workload: Workload) -> float:
    """Smallest main-function memory (GB, before rounding) holding ``local_experts`` experts."""
    if local_experts < 0:
        raise ValueError(f"main_required_gb: negative local expert count {local_experts}")
    shape = profiles.shape
    state = workload.total_tokens * (shape.kv_bytes_per_token + shape.activation_bytes)
    weights = shape.main_bytes + local_experts * shape.bytes_per_expert
    return (weights + state) / BYTES_PER_GB + profiles.runtime_gb


def main_memory_gb(
    local_experts: int,
    profiles: Profiles,
    cluster: Cluster,
    workload: Workload,
    at_least_gb: float = 0.0,
) -> float:
    """Main memory on the grid (main's ceiling: the main node's capacity)."""
    need = max(main_required_gb(local_experts, profiles, workload), at_least_gb)
    return cluster.grid.round_up(need, maximum_gb=cluster.main.capacity_gb)


def check_inputs(forecast: Forecast, profiles: Profiles, workload: Workload) -> None:
    """Preconditions every policy shares: forecast shaped like the model, finite, rows summing to 1."""
    shape = profiles.shape
    expected = (shape.moe_layers, shape.experts_per_layer)
    if forecast.distribution.shape != expected:
        raise ValueError(
            f"forecast is {forecast.distribution.shape}, model {shape.name!r} is [layers, experts] = {expected}"
        )
    distribution = forecast.distribution
    if not np.all(np.isfinite(distribution)) or np.any(distribution < 0):
        raise ValueError("forecast.distribution must be finite and >= 0")
    if not np.allclose(distribution.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("forecast.distribution rows must sum to 1")
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")


def forecast_summary(forecast: Forecast) -> dict:
    """What a plan records about its forecast: source, confidence, skew (max/mean share per layer)."""
    distribution = forecast.distribution
    skew = distribution.max(axis=1) * distribution.shape[1]
    return {
        "source": forecast.source,
        "confidence": float(forecast.confidence),
        "layers": int(distribution.shape[0]),
        "experts": int(distribution.shape[1]),
        "max_over_mean_share": [round(float(v), 4) for v in skew],
        "stragglers": [list(s) for s in forecast.stragglers],
    }


def memory_problems(
    plan: Plan, profiles: Profiles, cluster: Cluster, workload: Workload
) -> list[str]:
    """Every memory rule a plan breaks (empty when it keeps them all).

    Functions: on the grid, within its ceiling, >= weights + buffer + runtime. Main: >= its
    requirement, within the main node. Placed replicas: per node, within capacity (the main
    node's capacity less the main function).
    """
    problems = []
    grid = cluster.grid
    for function in plan.functions:
        need = function_required_gb(function.experts, profiles, workload)
        if function.memory_gb < need - 1e-9:
            problems.append(f"{function.id}: {function.memory_gb} GB < required {need:.3f} GB")
        if not grid.contains(function.memory_gb) or function.memory_gb > grid.maximum_gb + 1e-9:
            problems.append(f"{function.id}: {function.memory_gb} GB off the grid {grid}")
    need = main_required_gb(len(plan.local), profiles, workload)
    if plan.main.memory_gb < need - 1e-9:
        problems.append(f"main: {plan.main.memory_gb} GB < required {need:.3f} GB")
    used: Counter[str] = Counter({cluster.main_node: plan.main.memory_gb})
    for function in plan.functions:
        for node in function.nodes:
            used[node] += function.memory_gb
    for node, gb in used.items():
        capacity = cluster.node(node).capacity_gb
        if gb > capacity + 1e-9:
            problems.append(f"node {node}: {gb:.3f} GB placed > capacity {capacity} GB")
    return problems
