"""The shared estimator: a case worked by hand, and the properties policies rely on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from allocator import baselines
from allocator.cost import Loads, call_probability, estimate, spaced_call_s
from allocator.model import Cluster, ModelShape, Node, Prices, WarmInstance, Workload
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import ExpertLatency, HyperbolicCurve, LinearModel, Profiles
from predictor.forecast import Forecast


def hand_profiles() -> Profiles:
    shape = ModelShape(1, 2, 1, 64, 1_000_000, 1_000_000, 0, 128, "hand")
    return Profiles(
        host="hand",
        model="hand",
        shape=shape,
        expert=ExpertLatency(HyperbolicCurve(0.0, 0.01), 0.0),  # 10 ms per call at 1 GB
        gpu_expert=LinearModel(0.001, 0.0),
        dense=LinearModel(0.001, 0.0),  # 1 ms per layer
        cold_start=LinearModel(0.5, 0.0),
        main_cold_start=LinearModel(1.0, 0.0),
        scatter_gather=LinearModel(0.002, 0.0),  # 2 ms per call
        runtime_gb=0.0,
    )


def hand_case():
    """(cluster, workload, forecast, plan) of the hand-worked case: one 1-CPU node, N_in 4,
    N_out 2, expert 0 local in a 2 GB main, expert 1 in a 0.5 GB function."""
    cluster = Cluster((Node("n", "cpu", 8.0, 1),), "n")
    forecast = Forecast(np.array([[0.75, 0.25]]), np.array([[4.5, 1.5]]), 1.0)
    plan = Plan(
        "hand", MainSpec(2.0, "cpu"), frozenset({(0, 0)}), (FunctionSpec("f", ((0, 1),), 0.5),)
    )
    return cluster, Workload(4, 2), forecast, plan


def test_hand_worked_case():
    """One layer, two experts, top-1; expert 0 local in a 2 GB CPU main on a 1-CPU node, expert
    1 in a 0.5 GB function. N_in = 4, N_out = 2, shares (0.75, 0.25).

    Loads: prefill (3, 1) slots, decode (1.5, 0.5) slots = (0.75, 0.25) per decode token.
    Prefill: local speed min(2 GB, 1 CPU * 1 GB) = 1 GB -> 10 ms (one call, slope 0); remote
      10 ms / 0.5 + 2 ms = 22 ms; both called (P = 1), so the layer takes max = 22 ms.
      TTFT = main cold 1.0 + dense 0.001, the remote is ready at 1.0 (below) < 1.001, + 0.022
      = 1.023 s.
    Decode step: local P = 0.75, 10 ms; remote P = 0.25, 22 ms. Weights of "slowest called":
      remote 0.25, local 0.75 * (1 - 0.25) = 0.5625, sum 0.8125; top-1 routing calls a branch
      on every token, so they are rescaled to sum to 1:
      E[max] = (0.022 * 0.25 + 0.010 * 0.5625) / 0.8125 = 0.011125 / 0.8125 = 0.0136923;
      step = 0.001 + 0.0136923 = TPOT 0.0146923 s, decode 0.0293846 s, wall 1.0523846 s.
    Invocation billing with INIT: the function bills its own compute per call (20 ms, already
      on the 1 ms grid; the 2 ms transfer is not its time): 0.020 + 2 * 0.25 * 0.020 = 0.030 s,
      + INIT 1.0 s (0.5 s alone at a full vCPU, at its own quota of 0.5 vCPU; alone on its
      node: no fork queue, no one to share with) -> 1.030 s * 0.5 GB = 0.515 GB-s; main: (wall - cold + cold) * 2 GB = 2.1047692 GB-s.
      Calls: main 1 + prefill 1 + 2 * 0.25 = 2.5.
    """
    profiles = hand_profiles()
    cluster, workload, forecast, plan = hand_case()
    result = estimate(plan, Loads.from_forecast(forecast, workload, 1), profiles, cluster, workload)
    assert result.layer_prefill_s == pytest.approx((0.022,))
    assert result.ttft_s == pytest.approx(1.023)
    assert result.layer_decode_s == pytest.approx((0.011125 / 0.8125,))
    assert result.tpot_s == pytest.approx(0.001 + 0.011125 / 0.8125)
    wall = 1.023 + 2 * (0.001 + 0.011125 / 0.8125)
    assert result.wall_s == pytest.approx(wall)
    assert result.function_gb_s["f"] == pytest.approx(0.515)
    assert result.function_init_gb_s == pytest.approx(0.5)
    assert result.main_gb_s == pytest.approx(2 * wall)
    assert result.invocations == pytest.approx(2.5)
    prices = cluster.prices
    assert result.money == pytest.approx(
        (0.515 + 2 * wall) * prices.cpu_gb_s + 2.5 * prices.per_request
    )

    # A warm instance of f: no INIT billed, nothing to wait for.
    warm = (WarmInstance("f", frozenset({(0, 1)}), 0.5),)
    warmed = estimate(
        plan, Loads.from_forecast(forecast, workload, 1), profiles, cluster, workload, warm=warm
    )
    assert warmed.function_gb_s["f"] == pytest.approx(0.030 * 0.5)
    # Instance billing: spawn to end plus keep-alive, for every instance.
    kept = Cluster(cluster.nodes, "n", prices=Prices(billing="instance", keep_alive_s=10.0))
    held = estimate(plan, Loads.from_forecast(forecast, workload, 1), profiles, kept, workload)
    assert held.function_gb_s["f"] == pytest.approx(0.5 * (wall + 10.0))
    assert held.invocations == pytest.approx(2.5)


def test_call_probability_bounds():
    assert call_probability(np.array([0.0, 0.0]), 2) == 0.0
    assert call_probability(np.array([0.25]), 2) == pytest.approx(0.25)
    assert call_probability(np.full(8, 0.25), 2) == pytest.approx(1.0)  # all top-2 slots land here
    assert call_probability(np.array([5.0, 0.1]), 2) == 1.0


def test_loads_hedged_keeps_totals_and_moves_toward_uniform(rng):
    prefill = rng.dirichlet(np.full(6, 0.3), size=3) * 40
    loads = Loads(prefill, prefill / 4)
    hedged = loads.hedged(0.25)
    np.testing.assert_allclose(hedged.prefill.sum(axis=1), prefill.sum(axis=1))
    assert np.all(hedged.prefill.max(axis=1) <= prefill.max(axis=1) + 1e-12)
    np.testing.assert_allclose(loads.hedged(1.0).prefill, prefill)
    with pytest.raises(ValueError):
        loads.hedged(1.5)


def test_one_function_per_expert_pays_the_slowest_called_not_the_sum(
    shape, profiles, cpu_cluster, workload, rng
):
    """Decode with every expert in its own function waits for the max of top_k calls; one
    function per layer computes its selected experts one after the other."""
    forecast = Forecast.uniform(
        shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k
    )
    loads = Loads.from_forecast(forecast, workload, shape.top_k)
    everyone = [
        (layer, e) for layer in range(shape.moe_layers) for e in range(shape.experts_per_layer)
    ]
    split = Plan(
        "split",
        MainSpec(1.0),
        frozenset(),
        tuple(FunctionSpec(f"{x}", (x,), 1.025) for x in everyone),
    )
    layered = Plan(
        "layered",
        MainSpec(1.0),
        frozenset(),
        tuple(
            FunctionSpec(f"L{layer}", tuple(x for x in everyone if x[0] == layer), 1.025)
            for layer in range(shape.moe_layers)
        ),
    )
    one_call = float(profiles.expert.seconds(1.025, 1)) + float(
        profiles.scatter_gather(2 * shape.activation_bytes)
    )
    per_split = estimate(split, loads, profiles, cpu_cluster, workload).layer_decode_s[0]
    per_layered = estimate(layered, loads, profiles, cpu_cluster, workload).layer_decode_s[0]
    assert one_call * 0.9 < per_split < one_call * shape.top_k * 0.8
    assert per_layered > per_split


def test_estimator_rejects_mismatched_loads(profiles, cpu_cluster, workload, slo, shape):
    forecast = Forecast.uniform(
        shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k
    )
    plan = baselines.mix(forecast, profiles, slo, cpu_cluster, workload)
    with pytest.raises(ValueError, match="loads"):
        estimate(plan, Loads(np.ones((2, 2)), np.ones((2, 2))), profiles, cpu_cluster, workload)


def test_gpu_main_bills_host_experts_at_the_cpu_price(shape, profiles, gpu_cluster, workload, slo):
    forecast = Forecast.uniform(
        shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k
    )
    mixed = baselines.mix(forecast, profiles, slo, gpu_cluster, workload)
    gpu_only = baselines.all_local(forecast, profiles, slo, gpu_cluster, workload)
    assert mixed.main == gpu_only.main  # same memory, same device: only where experts sit differs
    assert mixed.params["estimate"]["cpu_gb_s"] > 0
    assert gpu_only.params["estimate"]["cpu_gb_s"] == 0
    assert gpu_only.params["estimate"]["tpot_s"] < mixed.params["estimate"]["tpot_s"]


def test_parallel_functions_share_the_function_nodes_cpus():
    """Top-2 of 2 experts, each in its own 1 GB (1 vCPU) function: both are called on every
    token. With 2 vCPUs of function nodes they compute side by side (the layer waits for the
    slower: 10 ms + 2 ms transfer); with 1 vCPU they take turns, and the layer takes at least
    their work together over it (2 x 10 ms)."""
    from dataclasses import replace

    profiles = replace(hand_profiles(), shape=ModelShape(1, 2, 2, 64, 1_000_000, 1_000_000, 0, 128, "hand"))
    workload = Workload(4, 2)
    forecast = Forecast(np.array([[0.5, 0.5]]), np.array([[6.0, 6.0]]), 1.0)
    plan = Plan("two", MainSpec(1.0, "cpu"), frozenset(),
                (FunctionSpec("a", ((0, 0),), 1.0), FunctionSpec("b", ((0, 1),), 1.0)))
    loads = Loads.from_forecast(forecast, workload, 2)

    def layer_decode(cpus: int) -> float:
        cluster = Cluster((Node("main", "cpu", 8.0, 1), Node("n", "cpu", 8.0, cpus)), "main")
        return estimate(plan, loads, profiles, cluster, workload).layer_decode_s[0]

    assert layer_decode(2) == pytest.approx(0.012)
    assert layer_decode(1) == pytest.approx(0.020)


def test_a_call_that_finds_its_quota_unspent_runs_at_full_speed():
    """The expert curve is measured back to back (a 0.5 GB function takes 20 ms for 10 ms of
    work: it waits out its quota); a call that starts with its quota unspent runs at full speed
    until the quota is spent. The hand-worked case's function, with a CFS period known:"""
    assert spaced_call_s(0.010, 0.5, 0.100) == pytest.approx(0.010)  # 50 ms quota: never throttled
    assert spaced_call_s(0.010, 0.5, 0.010) == pytest.approx(0.015)  # 5 ms, wait 5 ms, 5 ms
    assert spaced_call_s(0.010, 1.0, 0.010) == pytest.approx(0.010)  # a whole vCPU: never throttled
    profiles = hand_profiles()
    cluster, workload, forecast, plan = hand_case()
    loads = Loads.from_forecast(forecast, workload, 1)
    back_to_back = estimate(plan, loads, profiles, cluster, workload)
    long_period = estimate(plan, loads, dataclasses.replace(profiles, cfs_period_s=0.1), cluster, workload)
    short_period = estimate(plan, loads, dataclasses.replace(profiles, cfs_period_s=0.01), cluster, workload)
    assert back_to_back.layer_prefill_s == pytest.approx((0.022,))
    assert long_period.layer_prefill_s == pytest.approx((0.012,))  # 10 ms of work + 2 ms transfer
    assert short_period.layer_prefill_s == pytest.approx((0.017,))  # one prefill call: quota unspent
    # Decode: the function is busy part of the time, so its calls fall between the two.
    assert long_period.tpot_s < short_period.tpot_s < back_to_back.tpot_s
    assert long_period.function_gb_s["f"] < back_to_back.function_gb_s["f"]


def test_a_re_plan_loads_only_the_local_experts_the_running_main_lacks():
    """main_held: the main is up; the plan's local experts it lacks load before the prefill at
    Profiles.weights_s (the cold-start line's slope), on the TTFT and billed at the main's size;
    holding them all costs nothing, like main_warm; no main start-up in either case."""
    profiles = dataclasses.replace(hand_profiles(), cold_start=LinearModel(0.5, 2e-6))  # 2 s per expert
    cluster, workload, forecast, plan = hand_case()
    loads = Loads.from_forecast(forecast, workload, 1)
    warm = (WarmInstance("f", frozenset({(0, 1)}), 0.5),)
    up = estimate(plan, loads, profiles, cluster, workload, warm=warm, main_warm=True)
    held = estimate(plan, loads, profiles, cluster, workload, warm=warm, main_held={(0, 0), (0, 1)})
    assert held.ttft_s == pytest.approx(up.ttft_s) and held.main_gb_s == pytest.approx(up.main_gb_s)
    lacking = estimate(plan, loads, profiles, cluster, workload, warm=warm, main_held=())
    assert lacking.main_cold_s == pytest.approx(2.0)  # expert 0: 1e6 bytes x 2e-6 s/B
    assert lacking.ttft_s == pytest.approx(up.ttft_s + 2.0)
    assert lacking.main_gb_s == pytest.approx(up.main_gb_s + 2.0 * 2.0)  # 2 GB main, 2 s
    cold = estimate(plan, loads, profiles, cluster, workload, warm=warm)
    assert cold.main_cold_s == pytest.approx(1.0)  # main_cold_start: a start-up, not a load
