"""The papers' baselines as policies: valid, memory-correct plans; each baseline's own rules
(layout, prices, replica counts, packing); registration in the config and the planning glue."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from allocator import paper_baselines as pb
from allocator.baselines import all_local
from allocator.cost import Loads, estimate
from allocator.sizing import memory_problems
from predictor.forecast import Forecast

from .conftest import random_forecast


@pytest.mark.parametrize("name", sorted(pb.POLICIES))
def test_every_baseline_returns_a_valid_plan(name, shape, profiles, slo, workload, gpu_cluster, cpu_cluster, rng):
    for cluster in (gpu_cluster, cpu_cluster):
        for _ in range(2):
            forecast = random_forecast(rng, shape, workload)
            plan = pb.POLICIES[name](forecast, profiles, slo, cluster, workload)
            assert plan.policy == name
            plan.validate(shape.moe_layers, shape.experts_per_layer)
            assert memory_problems(plan, profiles, cluster, workload) == []
            assert all(len(f.nodes) in (0, f.replicas) for f in plan.functions)
            assert len({f.id for f in plan.functions}) == len(plan.functions)
            assert "estimate" in plan.params and "reason" in plan.params
            json.dumps(plan.params, allow_nan=False)
            again = pb.POLICIES[name](forecast, profiles, slo, cluster, workload)
            assert again == plan  # deterministic


def test_remoe_cpu_gpu_fetch(shape, profiles, slo, workload, gpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload)
    cpu = pb.cpu_only(forecast, profiles, slo, gpu_cluster, workload)
    assert cpu.main.device == "cpu" and not cpu.local and len(cpu.functions) == shape.moe_layers
    assert all(len(f.experts) == shape.experts_per_layer and f.memory_gb >= 1.0 for f in cpu.functions)
    gpu = pb.gpu_only(forecast, profiles, slo, gpu_cluster, workload)
    assert gpu.main.device == "gpu" and len(gpu.local) == shape.moe_layers * shape.experts_per_layer
    est = gpu.params["estimate"]
    assert est["cpu_gb_s"] == 0 and est["gpu_gb_s"] > 0  # everything at c_g
    fetch = pb.fetch(forecast, profiles, slo, gpu_cluster, workload)
    assert fetch.params["local_experts_device"] == "cpu" and fetch.params["swap_s"] == 0.0
    assert fetch.params["estimate"]["cpu_gb_s"] > 0  # resident experts at c_c
    # same memory, experts priced at c_c instead of c_g: Fetch's GB-s rate is cheaper
    loads = Loads.from_forecast(forecast, workload, shape.top_k)
    rate = [estimate(p, loads, profiles, gpu_cluster, workload) for p in (gpu, fetch)]
    assert rate[1].money / rate[1].wall_s < rate[0].money / rate[0].wall_s


def test_lambdaml_every_expert_alone_at_3008_mb(shape, profiles, slo, workload, cpu_cluster, rng):
    plan = pb.lambdaml(random_forecast(rng, shape, workload), profiles, slo, cpu_cluster, workload)
    assert len(plan.functions) == shape.moe_layers * shape.experts_per_layer and not plan.local
    assert all(len(f.experts) == 1 and f.replicas == 1 for f in plan.functions)
    sizes = {f.memory_gb for f in plan.functions}
    assert len(sizes) == 1 and 3008 / 1024 <= sizes.pop() < 3008 / 1024 + cpu_cluster.grid.step_gb


def test_cpu_cluster_states_its_price(shape, profiles, slo, workload, cpu_cluster, rng):
    plan = pb.cpu_cluster(random_forecast(rng, shape, workload), profiles, slo, cpu_cluster, workload,
                          price_per_hour=3.6)
    assert plan.params["serverful"] == {"price_per_hour": 3.6, "cost_per_s": pytest.approx(0.001)}
    assert plan.main.device == "cpu" and not plan.functions
    with pytest.raises(ValueError, match="price_per_hour"):
        pb.cpu_cluster(random_forecast(rng, shape, workload), profiles, slo, cpu_cluster, workload, price_per_hour=0)


def test_static_ep_is_fixed_and_contiguous(shape, profiles, slo, workload, gpu_cluster, rng):
    plans = [pb.static_ep(random_forecast(rng, shape, workload), profiles, slo, gpu_cluster, workload)
             for _ in range(3)]
    assert all(p.functions == plans[0].functions for p in plans)  # whatever the forecast
    plan = plans[0]
    assert all(f.replicas == 1 and len(f.experts) == 1 for f in plan.functions)
    nodes = plan.params["nodes"]
    for f in plan.functions:
        (_, e), = f.experts
        assert f.nodes == (nodes[e * len(nodes) // shape.experts_per_layer],)


def test_capacity_factor_keeps_the_static_layout(shape, profiles, slo, workload, gpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload)
    cf = pb.capacity_factor_policy(forecast, profiles, slo, gpu_cluster, workload)
    ep = pb.static_ep(forecast, profiles, slo, gpu_cluster, workload)
    assert cf.capacity_factor == 1.25 and ep.capacity_factor == 0.0
    assert cf.functions == ep.functions
    with pytest.raises(ValueError, match="capacity_factor"):
        pb.capacity_factor_policy(forecast, profiles, slo, gpu_cluster, workload, capacity_factor=0)


def test_balanced_packing():
    pack = pb.balanced_packing([9, 8, 7, 6, 5, 4], 2)
    # 9 -> 0; 8 -> 1; 7 -> 1 (8 < 9); 6 -> 0 (9 < 15); 5 -> 0 (tie: lower index); 4 -> 1 (pack 0 is full)
    assert pack.tolist() == [0, 1, 1, 0, 0, 1]
    for seed in range(5):
        w = np.random.default_rng(seed).zipf(1.3, 23).astype(float)
        pack = pb.balanced_packing(w, 4)
        counts = np.bincount(pack, minlength=4)
        assert counts.max() <= math.ceil(23 / 4) and counts.sum() == 23


def test_eplb_replicates_the_hottest_and_balances(shape, profiles, slo, workload, gpu_cluster):
    k = shape.experts_per_layer
    distribution = np.tile(np.array([0.5, 0.2] + [0.3 / (k - 2)] * (k - 2)), (shape.moe_layers, 1))
    load = distribution * workload.total_tokens * shape.top_k
    forecast = Forecast(distribution, load, 1.0, (), "moving-average")
    plan = pb.eplb(forecast, profiles, slo, gpu_cluster, workload)
    extra = math.ceil(0.25 * k)
    for layer in range(shape.moe_layers):
        mine = [f for f in plan.functions if f.experts[0][0] == layer]
        replicas = [f.replicas for f in mine]
        assert sum(replicas) == k + extra
        assert replicas[0] == max(replicas) and replicas[0] > 1  # the hottest expert first
        per_replica = distribution[layer] / np.array(replicas)
        static_max = distribution[layer].max()
        assert per_replica.max() < static_max
    assert plan.params["redundant_per_layer"] == extra


def test_oracle_records_whether_the_forecast_is_the_truth(shape, profiles, slo, workload, gpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload)
    guessed = pb.oracle(forecast, profiles, slo, gpu_cluster, workload)
    assert guessed.policy == "oracle" and guessed.params["forecast_is_truth"] is False
    truth = pb.oracle(replace(forecast, source="oracle"), profiles, slo, gpu_cluster, workload)
    assert truth.params["forecast_is_truth"] is True and truth.params["inner"] == "moeless"
    other = pb.oracle(forecast, profiles, slo, gpu_cluster, workload, inner="remoe")
    assert other.policy == "oracle" and other.params["inner"] == "remoe"
    with pytest.raises(ValueError, match="inner"):
        pb.oracle(forecast, profiles, slo, gpu_cluster, workload, inner="nope")


def test_gpu_only_costs_more_than_all_local_on_a_cpu_main(shape, profiles, slo, workload, cpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload)
    loads = Loads.from_forecast(forecast, workload, shape.top_k)
    gpu, local = (estimate(policy(forecast, profiles, slo, cpu_cluster, workload), loads, profiles, cpu_cluster,
                           workload) for policy in (pb.gpu_only, all_local))
    assert gpu.gpu_gb_s > 0 and local.gpu_gb_s == 0
    assert gpu.money / gpu.billed_gb_s == pytest.approx(3 * local.money / local.billed_gb_s, rel=0.05)  # c_g = 3 c_c


def test_registered_in_config_and_planning():
    from mesh import planning
    from mesh.config import KNOWN_POLICIES, load_config, resolve_model_path
    from nodes.model.config import MoEConfig

    assert set(pb.POLICIES) <= set(KNOWN_POLICIES)
    model = MoEConfig.from_file(resolve_model_path("bundled"))
    for name in ("cpu-only", "cpu-cluster", "static-ep", "eplb"):
        config = load_config(None, {"policy.name": name, "nodes[0].capacity_gb": 64.0,
                                    "nodes[1].capacity_gb": 64.0})
        plan = planning.make_plan(config, model)
        assert plan.policy == name
    config = load_config(None, {"policy.name": "cpu-cluster", "billing.serverful_price_per_hour": 2.0})
    assert planning.make_plan(config, model).params["serverful"]["price_per_hour"] == 2.0
