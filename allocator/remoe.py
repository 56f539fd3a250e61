"""Remoe's allocation pipeline (arXiv 2512.18674; PAPERS.md 1.4 A5-A8), on our cost model.

Entry point: :func:`plan`. Steps, each a small function below:

1. **MMP (A5)**, :func:`_preallocate`: start with every expert remote (b = 1) and keep one
   more expert per layer local (eps = 1/K) until the worst-case TTFT and TPOT meet the SLOs
   (test first, then decrement, [D]). Worst case from Hoeffding (Cor. 1): m experts of a
   layer receive at most ``hoeffding * sqrt(n) + m * n / K`` of its n token-slots
   (``hoeffding`` defaults to the paper's sqrt(3)/2, i.e. ``sqrt(3n)/2``; one-sided Hoeffding
   at 5 % would give about 1.22, PAPERS.md 1.8), n = N_in * top_k for prefill and
   N_out * top_k for decode ([D]). The remote path is timed at the largest remote size
   ``M_cal``; the main gets ``max(base + local experts, M_cal)`` so local experts are no
   slower than remote ones. We keep the max(local, remote) the paper drops.
2. **Remote selection (A6)**, :func:`_select_remote`: per layer, the b*K experts of smallest
   utility ``u = N_in * s + N_out * top_k * s`` (as printed; ties by lower index).
3. **Remote memory (A7)**: ``allocator.lagrangian.solve_memory_lagrangian`` with
   ``w_l = top_k * s_l`` remote calls per token, the TPOT budget left by the dense part and
   the remote overheads, rounded up to the grid.
4. **Replicas + LPT (A8)**, :func:`_replicas`: z_l starts at the fewest replicas meeting the
   payload cap and memory; then one replica at a time to the layer of largest potential
   ``Cost(Z) - Cost(Z with z_l + 1)`` until the Thm 4 worst-case TTFT meets the SLO ([D]: the
   text says TPOT, but z only changes prefill; [D] only among layers whose remote bound
   exceeds the local worst case, where a replica can help), then while some potential is > 0
   (z_l <= z_max). Each replica is one FunctionSpec holding its LPT subset (replicas=1).

The remote size ceiling ``M_cal`` defaults to the grid size where the expert curve saturates
(more memory buys no speed), capped by the grid maximum ([D]; the paper's per-model spec
ranges are in PAPERS.md 1.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from allocator.cost import annotate, call_probability, main_memory_split
from allocator.lagrangian import solve_memory_lagrangian
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.packing import lpt_partition
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import ExpertLatency, Profiles
from allocator.sizing import (
    check_inputs,
    experts_fitting,
    forecast_summary,
    function_required_gb,
    main_memory_gb,
)
from predictor.forecast import Forecast

HOEFFDING_CONSTANT = math.sqrt(3.0) / 2.0  # Remoe Thm 1: sqrt(3n)/2


@dataclass(frozen=True)
class Preallocation:
    """MMP's answer: main memory, remote experts per layer, worst-case latencies under it."""

    memory_gb: float
    remote_per_layer: int
    worst_ttft_s: float
    worst_tpot_s: float
    feasible: bool
    local_worst_prefill_s: float


def worst_case_slots(experts: int, slots: float, experts_per_layer: int, hoeffding: float) -> float:
    """Remoe Cor. 1: ``experts`` experts of a layer get at most ``hoeffding*sqrt(n) + m*n/K`` of n slots."""
    if experts <= 0 or slots <= 0:
        return 0.0
    return min(slots, hoeffding * math.sqrt(slots) + experts * slots / experts_per_layer)


def _work(latency: ExpertLatency, memory_gb: float, calls: float, slots: float) -> float:
    """Time of ``calls`` expert calls sharing ``slots`` tokens: ``g(y) * (calls*(1-s) + s*slots)``."""
    if slots <= 0:
        return 0.0
    calls = min(calls, slots)
    one = float(latency.curve(memory_gb))
    return one * (calls * (1.0 - latency.token_slope) + latency.token_slope * slots)


def remote_ceiling_gb(profiles: Profiles, cluster: Cluster, remote_max_gb: float | None) -> float:
    """``M_cal``: the largest remote size worth buying (see module docstring)."""
    grid = cluster.grid
    if remote_max_gb is not None:
        return grid.round_down(min(remote_max_gb, grid.maximum_gb))
    saturation = profiles.expert.curve.saturation_gb
    if math.isinf(saturation) or saturation >= grid.maximum_gb:
        return grid.round_down(grid.maximum_gb)
    return grid.round_up(saturation)


def _preallocate(
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    hoeffding: float,
    remote_max_gb: float,
) -> Preallocation:
    shape = profiles.shape
    layers, experts, top_k = shape.moe_layers, shape.experts_per_layer, shape.top_k
    latency, transfer, D = profiles.expert, profiles.scatter_gather, shape.activation_bytes
    prefill_slots = workload.prompt_tokens * top_k
    decode_slots = workload.new_tokens * top_k
    best: Preallocation | None = None
    for local_count in range(experts + 1):
        remote_count = experts - local_count
        try:
            memory = main_memory_gb(
                local_count * layers, profiles, cluster, workload, at_least_gb=remote_max_gb
            )
        except ValueError:
            break  # the main node cannot hold more local experts
        main_speed = cluster.main_speed(memory)
        remote_pre = worst_case_slots(remote_count, prefill_slots, experts, hoeffding)
        local_pre = worst_case_slots(local_count, prefill_slots, experts, hoeffding)
        remote_prefill = _work(latency, remote_max_gb, remote_count, remote_pre)
        if remote_count:
            remote_prefill += float(transfer(2 * D * remote_pre))
        local_prefill = _work(latency, main_speed, local_count, local_pre)
        remote_dec = (
            worst_case_slots(remote_count, decode_slots, experts, hoeffding) / workload.new_tokens
        )
        local_dec = (
            worst_case_slots(local_count, decode_slots, experts, hoeffding) / workload.new_tokens
        )
        remote_decode = float(latency.curve(remote_max_gb)) * remote_dec
        if remote_count:
            remote_decode += float(transfer(2 * D * remote_dec))
        local_decode = float(latency.curve(main_speed)) * local_dec
        main_bytes = shape.main_bytes + local_count * layers * shape.bytes_per_expert
        ttft = float(profiles.main_cold_start(main_bytes)) + layers * (
            float(profiles.dense(workload.prompt_tokens)) + max(local_prefill, remote_prefill)
        )
        tpot = layers * (float(profiles.dense(1)) + max(local_decode, remote_decode))
        feasible = ttft <= slo.ttft_s and tpot <= slo.tpot_s
        candidate = Preallocation(memory, remote_count, ttft, tpot, feasible, local_prefill)
        if feasible:
            return candidate
        violation = max(ttft / slo.ttft_s, tpot / slo.tpot_s)
        if best is None or violation < max(
            best.worst_ttft_s / slo.ttft_s, best.worst_tpot_s / slo.tpot_s
        ):
            best = candidate
    if best is None:
        raise ValueError("remoe: the main node cannot hold even the main model")
    return best


def _select_remote(
    distribution: np.ndarray, workload: Workload, top_k: int, remote_per_layer: int
) -> np.ndarray:
    """[layers, experts] bool: the ``remote_per_layer`` experts of smallest utility per layer."""
    utility = workload.prompt_tokens * distribution + workload.new_tokens * top_k * distribution
    order = np.argsort(utility, axis=1, kind="stable")[:, :remote_per_layer]
    mask = np.zeros(distribution.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def _replicas(
    remote_mask: np.ndarray,
    sizes_gb: np.ndarray,
    distribution: np.ndarray,
    preallocation: Preallocation,
    main_rate: float,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    hoeffding: float,
    max_replicas: int,
) -> tuple[dict[int, np.ndarray], dict]:
    """A8: replicas per layer and each layer's LPT assignment (expert -> replica)."""
    shape = profiles.shape
    layers, experts, top_k = shape.moe_layers, shape.experts_per_layer, shape.top_k
    prices, transfer, D = cluster.prices, profiles.scatter_gather, shape.activation_bytes
    prefill_slots = workload.prompt_tokens * top_k
    main_speed = cluster.main_speed(preallocation.memory_gb)
    upper_slots = hoeffding * math.sqrt(prefill_slots) + prefill_slots / experts  # Thm 4's N_up
    remote_layers = [layer for layer in range(layers) if remote_mask[layer].any()]
    weights, members, minimum, maximum, capacity, replica_cost, local_time = (
        {},
        {},
        {},
        {},
        {},
        {},
        {},
    )
    for layer in remote_layers:
        ids = np.flatnonzero(remote_mask[layer])
        slots = prefill_slots * distribution[layer, ids]
        y = float(sizes_gb[layer])
        members[layer] = ids
        weights[layer] = profiles.expert.expected_seconds(y, slots) + transfer.slope * 2 * D * slots
        capacity[layer] = experts_fitting(y, profiles, workload)
        if capacity[layer] < 1:
            raise ValueError(f"remoe: one expert does not fit {y} GB")
        payload = math.ceil(D * float(slots.sum()) / cluster.payload_limit_bytes)
        # One replica per expert at most: beyond that only micro-batching splits a payload.
        minimum[layer] = max(1, math.ceil(ids.size / capacity[layer]), min(payload, ids.size))
        maximum[layer] = max(minimum[layer], min(max_replicas, ids.size))
        if prices.billing == "invocation":
            cold = float(profiles.cold_start(shape.bytes_per_expert * ids.size / minimum[layer]))
            replica_cost[layer] = (
                y * cold * prices.cpu_gb_s if prices.bill_init else 0.0
            ) + prices.per_request
        else:
            held = prices.keep_alive_s + slo.ttft_s + workload.new_tokens * slo.tpot_s
            replica_cost[layer] = y * held * prices.cpu_gb_s
        local_slots = prefill_slots * distribution[layer, ~remote_mask[layer]]
        local_time[layer] = float(np.sum(profiles.expert.expected_seconds(main_speed, local_slots)))

    costs: dict[tuple[int, int], float] = {}  # (layer, z) -> cost: potentials reuse them

    def layer_cost(layer: int, z: int) -> float:
        if (layer, z) in costs:
            return costs[(layer, z)]
        assignment = lpt_partition(weights[layer], z, capacity[layer])
        bins = np.bincount(assignment, weights[layer], z) + transfer.intercept
        y = float(sizes_gb[layer])
        value = (
            main_rate * max(local_time[layer], float(bins.max()))
            + prices.cpu_gb_s * y * float(bins.sum())
            + z * replica_cost[layer]
        )
        costs[(layer, z)] = value
        return value

    heavy = {  # Thm 4: one expert receiving N_up slots, compute + transfer
        layer: float(profiles.expert.seconds(float(sizes_gb[layer]), max(upper_slots, 1.0)))
        + transfer.slope * 2 * D * upper_slots
        for layer in remote_layers
    }
    total = {layer: float(weights[layer].sum()) for layer in remote_layers}

    def bound(layer: int, z: int) -> float:  # Thm 4
        return (z - 1) / z * heavy[layer] + total[layer] / z + transfer.intercept

    dense = float(profiles.dense(workload.prompt_tokens))
    main_cold = float(
        profiles.main_cold_start(
            shape.main_bytes + int((~remote_mask).sum()) * shape.bytes_per_expert
        )
    )

    def ttft_bound(z: dict[int, int]) -> float:
        total = main_cold + layers * dense
        for layer in range(layers):
            remote = bound(layer, z[layer]) if layer in z else 0.0
            total += max(preallocation.local_worst_prefill_s, remote)
        return total

    z = {layer: minimum[layer] for layer in remote_layers}

    def potentials() -> dict[int, float]:
        return {
            layer: layer_cost(layer, z[layer]) - layer_cost(layer, z[layer] + 1)
            for layer in remote_layers
            if z[layer] < maximum[layer]
        }

    steps = 0
    while ttft_bound(z) > slo.ttft_s:
        # [D] only layers whose remote bound is their bottleneck: a replica elsewhere cannot
        # lower the bound (the paper assumes the remote path is always the bottleneck).
        pot = {
            layer: value
            for layer, value in potentials().items()
            if bound(layer, z[layer]) > preallocation.local_worst_prefill_s
        }
        if not pot:
            break
        z[max(pot, key=lambda layer: (pot[layer], -layer))] += 1
        steps += 1
    while True:
        pot = potentials()
        if not pot or max(pot.values()) <= 0:
            break
        z[max(pot, key=lambda layer: (pot[layer], -layer))] += 1
        steps += 1
    assignments = {
        layer: lpt_partition(weights[layer], z[layer], capacity[layer]) for layer in remote_layers
    }
    record = {
        "replicas_per_layer": {str(layer): z[layer] for layer in remote_layers},
        "ttft_bound_s": ttft_bound(z) if remote_layers else None,
        "replica_steps": steps,
    }
    return {layer: (members[layer], assignments[layer]) for layer in remote_layers}, record


def plan(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    hoeffding: float = HOEFFDING_CONSTANT,
    eta: float = 0.1,
    max_replicas: int = 8,
    remote_max_gb: float | None = None,
) -> Plan:
    """Remoe's plan for one request (see module docstring). ``warm`` is not used by Remoe."""
    check_inputs(forecast, profiles, workload)
    if hoeffding < 0 or eta < 0 or max_replicas < 1:
        raise ValueError("remoe: need hoeffding >= 0, eta >= 0, max_replicas >= 1")
    shape, grid, prices = profiles.shape, cluster.grid, cluster.prices
    layers, experts, top_k = shape.moe_layers, shape.experts_per_layer, shape.top_k
    distribution = np.asarray(forecast.distribution, dtype=float)
    ceiling = remote_ceiling_gb(profiles, cluster, remote_max_gb)
    pre = _preallocate(profiles, slo, cluster, workload, hoeffding, ceiling)
    remote_mask = _select_remote(distribution, workload, top_k, pre.remote_per_layer)
    local = frozenset((int(layer), int(e)) for layer, e in zip(*np.nonzero(~remote_mask)))
    device = cluster.main.kind
    host_gb, device_gb = main_memory_split(pre.memory_gb, device, True, profiles, workload)
    main_rate = host_gb * prices.cpu_gb_s + device_gb * prices.gpu_gb_s  # Remoe's H_w, $ per s
    params = {
        "forecast": forecast_summary(forecast),
        "local_experts_device": "cpu",
        "hoeffding": hoeffding,
        "mmp": {
            "memory_gb": pre.memory_gb,
            "remote_per_layer": pre.remote_per_layer,
            "remote_ceiling_gb": ceiling,
            "worst_ttft_s": pre.worst_ttft_s,
            "worst_tpot_s": pre.worst_tpot_s,
            "feasible": pre.feasible,
        },
    }
    functions: list[FunctionSpec] = []
    if pre.remote_per_layer:
        share = np.where(remote_mask, distribution, 0.0).sum(axis=1)  # s~_l
        weights = top_k * share
        per_token = distribution * top_k  # decode slots per token [layers, experts]
        overheads = np.array(
            [
                call_probability(per_token[layer, remote_mask[layer]], top_k)
                * profiles.scatter_gather.intercept
                + profiles.scatter_gather.slope * 2 * shape.activation_bytes * weights[layer]
                for layer in range(layers)
            ]
        )
        lower = np.array(
            [
                min(
                    max(
                        function_required_gb(
                            [(layer, int(e)) for e in np.flatnonzero(remote_mask[layer])],
                            profiles,
                            workload,
                        ),
                        grid.minimum_gb,
                    ),
                    ceiling,
                )
                for layer in range(layers)
            ]
        )
        budget = slo.tpot_s - layers * float(profiles.dense(1)) - float(overheads.sum())
        solution = solve_memory_lagrangian(
            weights,
            overheads,
            profiles.expert.curve,
            lower,
            np.full(layers, ceiling),
            budget,
            main_rate,
            prices.cpu_gb_s,
            eta=eta,
        )
        sizes = np.array([grid.round_up(float(y), maximum_gb=ceiling) for y in solution.memory_gb])
        partitions, replica_record = _replicas(
            remote_mask,
            sizes,
            distribution,
            pre,
            main_rate,
            profiles,
            slo,
            cluster,
            workload,
            hoeffding,
            max_replicas,
        )
        for layer, (ids, assignment) in sorted(partitions.items()):
            for replica in range(int(assignment.max()) + 1):
                chosen = tuple((layer, int(e)) for e in ids[assignment == replica])
                if chosen:
                    functions.append(
                        FunctionSpec(f"L{layer}-r{replica}", chosen, float(sizes[layer]))
                    )
        params["lagrangian"] = {
            "multiplier": solution.multiplier if math.isfinite(solution.multiplier) else None,
            "budget_s": solution.budget_s,
            "constraint_s": solution.constraint_s,
            "feasible": solution.feasible,
            "inner_solves": solution.inner_solves,
            "memory_gb_continuous": [round(float(v), 4) for v in solution.memory_gb],
            "memory_gb": [float(v) for v in sizes],
        }
        params["replicas"] = replica_record
    result = Plan("remoe", MainSpec(pre.memory_gb, device), local, tuple(functions), params=params)
    result.validate(layers, experts)
    return annotate(result, forecast, profiles, cluster, workload, warm=warm)
