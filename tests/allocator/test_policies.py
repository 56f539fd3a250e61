"""Every policy returns a valid, memory-correct plan with its reasons recorded; each policy's
own rules (Remoe's MMP/selection/replicas, MoEless's scaling and placement, the search)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allocator import POLICIES, bayesian, make_plan, moeless, remoe
from allocator.bayesian import DeploymentSearch, SearchSettings
from allocator.model import SLO, Cluster, Node, Prices, WarmInstance, Workload
from allocator.sizing import function_required_gb, memory_problems
from predictor.forecast import Forecast

from .conftest import random_forecast

FAST_SEARCH = SearchSettings(iterations=15, patience=4)


def options_for(name: str, shape) -> dict:
    if name == "static-split":
        return {
            "remote": [
                (layer, e)
                for layer in range(shape.moe_layers)
                for e in range(shape.experts_per_layer // 2)
            ]
        }
    if name == "bayesian":
        return {"settings": FAST_SEARCH}
    return {}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_a_valid_plan_for_random_forecasts(
    name, shape, profiles, slo, workload, gpu_cluster, cpu_cluster, rng
):
    for cluster in (gpu_cluster, cpu_cluster):
        for _ in range(3):
            forecast = random_forecast(rng, shape, workload)
            plan = make_plan(
                name, forecast, profiles, slo, cluster, workload, **options_for(name, shape)
            )
            assert plan.policy == name
            plan.validate(shape.moe_layers, shape.experts_per_layer)
            assert memory_problems(plan, profiles, cluster, workload) == []
            assert all(f.replicas >= 1 for f in plan.functions)
            assert all(len(f.nodes) in (0, f.replicas) for f in plan.functions)
            assert len({f.id for f in plan.functions}) == len(plan.functions)
            assert "forecast" in plan.params and "estimate" in plan.params
            json.dumps(plan.params, allow_nan=False)  # the record is plain, strict JSON data


def test_policies_are_deterministic(shape, profiles, slo, workload, gpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload)
    for name in POLICIES:
        first = make_plan(
            name, forecast, profiles, slo, gpu_cluster, workload, **options_for(name, shape)
        )
        second = make_plan(
            name, forecast, profiles, slo, gpu_cluster, workload, **options_for(name, shape)
        )
        assert first == second, name


def test_make_plan_rejects_unknown_names_and_bad_forecasts(
    shape, profiles, slo, workload, cpu_cluster
):
    with pytest.raises(KeyError, match="unknown policy"):
        make_plan("fastest", None, profiles, slo, cpu_cluster, workload)
    wrong = Forecast.uniform(2, 3, 10, 1)
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        make_plan("remoe", wrong, profiles, slo, cpu_cluster, workload)


def test_baselines_shapes(shape, profiles, slo, workload, gpu_cluster):
    forecast = Forecast.uniform(
        shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k
    )
    every = shape.moe_layers * shape.experts_per_layer
    local = make_plan("all-local", forecast, profiles, slo, gpu_cluster, workload)
    assert (
        len(local.local) == every
        and not local.functions
        and local.params["local_experts_device"] == "main"
    )
    mixed = make_plan("mix", forecast, profiles, slo, gpu_cluster, workload)
    assert len(mixed.local) == every and mixed.params["local_experts_device"] == "cpu"
    remote = make_plan("all-remote", forecast, profiles, slo, gpu_cluster, workload)
    assert len(remote.functions) == every and {f.memory_gb for f in remote.functions} == {
        gpu_cluster.grid.round_down(10.0)
    }
    split = make_plan(
        "static-split",
        forecast,
        profiles,
        slo,
        gpu_cluster,
        workload,
        remote=[(0, 1), (0, 2), (3, 7)],
    )
    assert sorted(f.id for f in split.functions) == ["L0-r0", "L3-r0"]
    assert len(split.local) == every - 3
    with pytest.raises(ValueError, match="outside the model"):
        make_plan("static-split", forecast, profiles, slo, gpu_cluster, workload, remote=[(9, 0)])


def test_remoe_mmp_keeps_more_local_when_tpot_or_the_bound_tightens(
    shape, profiles, workload, cpu_cluster, rng
):
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    remote = {}
    for tpot in (0.05, 0.02):
        for constant in (0.5, remoe.HOEFFDING_CONSTANT, 2.0):
            plan = remoe.plan(
                forecast, profiles, SLO(1.5, tpot), cpu_cluster, workload, hoeffding=constant
            )
            remote[(tpot, constant)] = plan.params["mmp"]["remote_per_layer"]
    assert remote[(0.05, remoe.HOEFFDING_CONSTANT)] == shape.experts_per_layer  # loose: all remote
    assert remote[(0.02, remoe.HOEFFDING_CONSTANT)] < shape.experts_per_layer
    assert remote[(0.02, 0.5)] >= remote[(0.02, remoe.HOEFFDING_CONSTANT)] >= remote[(0.02, 2.0)]


def test_remoe_worst_case_slots_is_corollary_one():
    # sqrt(3 * 400) / 2 + 2 * 400 / 8 = 17.32 + 100
    assert remoe.worst_case_slots(2, 400, 8, remoe.HOEFFDING_CONSTANT) == pytest.approx(
        np.sqrt(1200) / 2 + 100
    )
    assert remoe.worst_case_slots(8, 400, 8, remoe.HOEFFDING_CONSTANT) == 400  # never more than all
    assert remoe.worst_case_slots(0, 400, 8, 1.0) == 0


def test_remoe_sends_the_least_used_experts_away(shape, profiles, workload, cpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    plan = remoe.plan(forecast, profiles, SLO(1.5, 0.02), cpu_cluster, workload)
    for layer in range(shape.moe_layers):
        remote = [e for f in plan.functions for lay, e in f.experts if lay == layer]
        local = [e for lay, e in plan.local if lay == layer]
        if remote and local:
            assert (
                forecast.distribution[layer, remote].max()
                <= forecast.distribution[layer, local].min()
            )
    sizes = plan.params["lagrangian"]["memory_gb"]
    assert all(cpu_cluster.grid.contains(v) for v in sizes)


def test_remoe_replicas_split_layers_by_lpt_when_they_pay(shape, profiles):
    """Without INIT billing a replica costs one request; a 2048-token prompt makes the GPU
    main wait on remote prefill, so replicas pay for themselves (A8 potential > 0)."""
    cluster = Cluster(
        (Node("gpu0", "gpu", 40.0, 8), Node("cpu0", "cpu", 32.0, 8)),
        "gpu0",
        prices=Prices(bill_init=False),
    )
    workload = Workload(2048, 16)
    forecast = Forecast.uniform(
        shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k
    )
    plan = remoe.plan(forecast, profiles, SLO(3.0, 0.05), cluster, workload)
    replicas = plan.params["replicas"]["replicas_per_layer"]
    assert min(replicas.values()) > 1
    for layer, count in replicas.items():
        assert len([f for f in plan.functions if f.id.startswith(f"L{layer}-")]) == count
    # A tiny payload cap forces replicas from the start (A8 step 1).
    capped = Cluster(cluster.nodes, "gpu0", payload_limit_bytes=300 * shape.activation_bytes)
    plan = remoe.plan(forecast, profiles, SLO(3.0, 0.05), capped, Workload(512, 16))
    assert min(plan.params["replicas"]["replicas_per_layer"].values()) > 1


def test_moeless_replicates_stragglers_and_respects_hosts(shape, profiles, slo, workload, rng):
    cluster = Cluster(
        (Node("gpu0", "gpu", 8.0, 8), Node("gpu1", "gpu", 8.0, 8), Node("cpu0", "cpu", 32.0, 8)),
        "gpu0",
    )
    for _ in range(5):
        forecast = random_forecast(rng, shape, workload)
        plan = moeless.plan(forecast, profiles, slo, cluster, workload)
        straggling = {tuple(s) for s in plan.params["stragglers"]}
        for f in plan.functions:
            assert set(f.nodes) <= {"gpu0", "gpu1"}  # GPU functions
            if f.replicas > 1:
                assert f.experts[0] in straggling
        used = {"gpu0": plan.main.memory_gb, "gpu1": 0.0}
        for f in plan.functions:
            for node in f.nodes:
                used[node] += f.memory_gb
        assert all(used[n] <= cluster.node(n).capacity_gb + 1e-9 for n in used)
        assert max(plan.params["node_load"].values()) <= plan.params["node_load_bound"] + 1e-9
        after = np.array(plan.params["max_over_mean_after"])
        assert np.all(after <= np.array(plan.params["max_over_mean_before"]) + 1e-9)


def test_moeless_places_replicas_where_warm_instances_run(
    shape, profiles, slo, workload, gpu_cluster, rng
):
    forecast = random_forecast(rng, shape, workload)
    cold = moeless.plan(forecast, profiles, slo, gpu_cluster, workload)
    size = cold.params["function_memory_gb"]
    warm = (WarmInstance("old", frozenset({(1, 3)}), size, "gpu0"),)
    hot = moeless.plan(forecast, profiles, slo, gpu_cluster, workload, warm=warm)
    function = next(f for f in hot.functions if f.experts == ((1, 3),))
    assert "gpu0" in function.nodes and hot.params["warm_hits"] == 1
    assert hot.params["estimate"]["money"] <= cold.params["estimate"]["money"]


def test_moeless_falls_back_to_cpu_nodes_without_gpu_room(
    shape, profiles, slo, workload, cpu_cluster, rng
):
    plan = moeless.plan(random_forecast(rng, shape, workload), profiles, slo, cpu_cluster, workload)
    assert all(f.memory_gb >= 1.0 for f in plan.functions)  # one vCPU each on CPU hosts


def test_bayesian_search_is_seeded_and_learns_from_measured_costs(
    shape, profiles, slo, workload, cpu_cluster, rng
):
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    settings = SearchSettings(iterations=12, patience=3, seed=7)
    first = bayesian.plan(forecast, profiles, slo, cpu_cluster, workload, settings=settings)
    again = bayesian.plan(forecast, profiles, slo, cpu_cluster, workload, settings=settings)
    assert first == again
    assert first.params["best_cost"] <= first.params["ods_cost"]
    # Driven by "measured" costs instead: a cost that prefers small memory everywhere.
    search = DeploymentSearch(forecast, profiles, slo, cpu_cluster, workload, settings)
    while not search.converged:
        candidate = search.propose()
        search.observe(candidate, sum(f.memory_gb * f.replicas for f in candidate.functions))
    best = search.best_plan()
    assert sum(f.memory_gb * f.replicas for f in best.functions) == min(
        cost for _, _, cost in search.history
    )
    with pytest.raises(ValueError, match="finite"):
        search.observe(best, float("nan"))


def test_bayesian_ods_start_meets_the_slo_when_it_can(shape, profiles, workload, cpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    loose = SLO(3.0, 0.2)
    start = DeploymentSearch(
        forecast, profiles, loose, cpu_cluster, workload, FAST_SEARCH
    ).propose()
    assert start.params["forecast"]["source"] == "test"
    # Each expert's memory is one of the options and at least its requirement.
    need = function_required_gb([(0, 0)], profiles, workload)
    assert all(f.memory_gb >= need for f in start.functions)
