"""Cold starts as they run: serial forks per node, INITs sharing the node's CPUs (allocator.coldstart),
and the estimator terms that follow from them (INIT billed, the main function's wait, per-call rounding)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from allocator import moeless
from allocator.coldstart import fit_spawn_shares, place_cold, simulate_node
from allocator.cost import Loads, billed_call_s, estimate
from allocator.model import Cluster, Node, Prices, WarmInstance, Workload
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import ExpertLatency, HyperbolicCurve, LinearModel, Profiles
from allocator.sizing import memory_problems
from predictor.forecast import Forecast

from .conftest import random_forecast, small_shape


def test_one_cold_start_alone_is_its_fork_then_its_init():
    ready, init = simulate_node(1.0, [0.01], [0.04])
    assert ready == pytest.approx([0.05]) and init == pytest.approx([0.04])
    ready, init = simulate_node(1.0, [0.01], [0.04], caps=[0.5])  # capped at half a CPU: twice as long
    assert ready == pytest.approx([0.09]) and init == pytest.approx([0.08])


def test_the_cgroup_join_takes_time_but_no_cpu():
    """INIT's fixed part (Profiles.init_fixed_s) delays its replica whatever its quota and
    leaves the node's CPU to the others: two joins at once overlap, where CPU work would not."""
    ready, init = simulate_node(1.0, [0.01], [0.04], caps=[0.5], fixed_s=[0.012])
    assert ready == pytest.approx([0.01 + 0.012 + 0.08]) and init == pytest.approx([0.092])
    ready, init = simulate_node(1.0, [0.0, 0.0], [0.0, 0.0], fixed_s=[0.05, 0.05])
    assert ready == pytest.approx([0.05, 0.05])  # no CPU: both at once on one CPU
    # one joining while the other computes: the computing one has the whole CPU meanwhile
    ready, init = simulate_node(1.0, [0.0, 0.0], [0.1, 0.1], fixed_s=[0.0, 0.05])
    assert ready == pytest.approx([0.15, 0.2])
    with pytest.raises(ValueError, match="fixed_s"):
        simulate_node(1.0, [0.0], [0.1], fixed_s=[-0.1])


def test_forks_are_serial_and_inits_share_the_node():
    ready, init = simulate_node(1.0, [0.01, 0.01, 0.01], [0.0, 0.0, 0.0])
    assert ready == pytest.approx([0.01, 0.02, 0.03])  # one fork after another
    assert init == pytest.approx([0.0, 0.0, 0.0])
    ready, init = simulate_node(1.0, [0.0, 0.0], [0.1, 0.1])  # forked at once: halves of one CPU
    assert ready == pytest.approx([0.2, 0.2]) and init == pytest.approx([0.2, 0.2])
    ready, _ = simulate_node(2.0, [0.0, 0.0], [0.1, 0.1])  # two CPUs: each its own
    assert ready == pytest.approx([0.1, 0.1])


def test_a_saturated_node_finishes_when_its_work_is_done():
    """Work-conserving: with every job at most one CPU and more jobs than CPUs, the last replica
    is ready when the node has done every fork and INIT."""
    spawn, work = [0.014] * 24, [0.042] * 24
    ready, init = simulate_node(1.0, spawn, work)
    assert ready.max() == pytest.approx(sum(spawn) + sum(work), rel=1e-9)
    assert np.all(np.diff(ready) >= -1e-12) and np.all(init >= np.array(work) - 1e-12)


def test_the_init_gate_admits_cold_starts_while_their_caps_fit():
    """With a gate of one vCPU, full-vCPU cold starts run one at a time: each INIT is its time
    alone (nothing shares the node with it but the next fork, which waits), ready one after
    another; quarter-vCPU ones (their quota) run four at a time, each at its quota."""
    ready, init = simulate_node(1.0, [0.01] * 3, [0.04] * 3, gate_cpus=1.0)
    assert init == pytest.approx([0.04] * 3) and ready == pytest.approx([0.05, 0.10, 0.15])
    ready, init = simulate_node(1.0, [0.0] * 8, [0.01] * 8, caps=[0.25] * 8, gate_cpus=1.0)
    assert init == pytest.approx([0.04] * 8) and ready == pytest.approx([0.04] * 4 + [0.08] * 4)
    ungated = simulate_node(1.0, [0.014] * 24, [0.042] * 24)
    gated = simulate_node(1.0, [0.014] * 24, [0.042] * 24, gate_cpus=1.0)
    assert gated[1].sum() < 0.2 * ungated[1].sum()  # the INIT billed: a fraction of the shared one
    assert gated[0].max() == pytest.approx(ungated[0].max(), rel=1e-9)  # the same work, done as soon


def test_the_measured_all_remote_burst():
    """allocator.coldstart's fit: 24 one-expert cold starts on one 1-vCPU node, 14 ms fork and
    42 ms INIT alone: forks ~49 ms apart, mean INIT ~0.43 s (measured 47 ms,
    0.42 s), 10x what parallel cold starts would bill."""
    ready, init = simulate_node(1.0, [0.014] * 24, [0.042] * 24)
    started = ready - init
    assert 0.04 <= float(np.mean(np.diff(started))) <= 0.06
    assert 0.35 <= float(init.mean()) <= 0.5
    assert 1.2 <= float(ready.max()) <= 1.5


def test_the_spawn_path_weight_is_fitted_back_from_a_burst():
    """fit_spawn_shares inverts simulate_node: the summed INIT grows with the spawn path's weight,
    and the weight that made a burst's INIT is the one found (on the 0.25 grid)."""
    spawn, alone = 0.02, [0.03] * 24
    sums = [float(simulate_node(1.0, [spawn] * 24, alone, spawn_shares=w)[1].sum()) for w in (0.5, 1, 2, 4, 8)]
    assert sums == sorted(sums) and sums[-1] > 3 * sums[0]
    for weight in (0.75, 2.0, 3.0, 5.5):
        measured = float(simulate_node(2.0, [spawn] * 24, alone, spawn_shares=weight)[1].sum())
        assert fit_spawn_shares([(2.0, alone)], spawn, measured) == pytest.approx(weight)
        # two 1-CPU nodes forking 12 each at once, as the default launch.toml runs them
        halves = [(1.0, alone[:12]), (1.0, alone[12:])]
        measured = sum(float(simulate_node(1.0, [spawn] * 12, a, spawn_shares=weight)[1].sum()) for _, a in halves)
        assert fit_spawn_shares(halves, spawn, measured) == pytest.approx(weight)
    assert fit_spawn_shares([(1.0, alone)], spawn, 1e6) == 16.0  # beyond the grid: its edge, never a crash
    with pytest.raises(ValueError):
        fit_spawn_shares([(1.0, [])], spawn, 1.0)


def test_the_estimate_uses_the_profiles_spawn_path_weight():
    plan, loads, profiles, cluster, workload = _burst_case()
    light, heavy = (estimate(plan, loads, dataclasses.replace(profiles, spawn_shares=w), cluster, workload,
                             main_warm=True) for w in (1.0, 6.0))
    assert heavy.function_init_gb_s > 1.1 * light.function_init_gb_s  # the forks take more of the CPUs
    with pytest.raises(ValueError, match="spawn_shares"):
        dataclasses.replace(profiles, spawn_shares=0.0)


def test_calls_are_billed_by_the_billed_curve_and_timed_by_the_latency_curve():
    plan, loads, profiles, cluster, workload = _burst_case()
    warm = [WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "a") for f in plan.functions]
    exact = Cluster(cluster.nodes, "main", prices=Prices(round_s=0.0))
    latency = ExpertLatency(HyperbolicCurve(2e-4, 4e-4, 1.0), 0.05)
    profiles = dataclasses.replace(profiles, expert=latency)
    half = dataclasses.replace(profiles, expert_billed=ExpertLatency(HyperbolicCurve(1e-4, 2e-4, 1.0), 0.05))
    same, halved = (estimate(plan, loads, p, exact, workload, warm=warm, main_warm=True) for p in (profiles, half))
    assert profiles.billed_expert is profiles.expert
    assert halved.summary()["functions_busy_gb_s"] == pytest.approx(same.summary()["functions_busy_gb_s"] / 2)
    assert halved.tpot_s == same.tpot_s and halved.ttft_s == same.ttft_s
    assert Profiles.from_json(half.to_json()).billed_expert == half.billed_expert


def test_init_money_is_the_cold_starts_share_and_amortises_over_reuse():
    plan, loads, profiles, cluster, workload = _burst_case()
    result = estimate(plan, loads, profiles, cluster, workload, main_warm=True)
    assert result.init_money == pytest.approx(result.function_init_gb_s * cluster.prices.cpu_gb_s)
    assert 0 < result.init_money < result.money
    assert result.amortised_money(1.0) == result.money
    assert result.amortised_money(4.0) == pytest.approx(result.money - 0.75 * result.init_money)
    warm = [WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "a") for f in plan.functions]
    hot = estimate(plan, loads, profiles, cluster, workload, warm=warm, main_warm=True)
    assert hot.init_money == 0.0 and hot.amortised_money(100.0) == hot.money
    with pytest.raises(ValueError, match="reuse"):
        result.amortised_money(0.5)


def test_cold_replicas_go_to_the_least_loaded_function_node():
    cluster = Cluster((Node("main", "cpu", 64.0, 2), Node("a", "cpu", 8.0, 1), Node("b", "cpu", 8.0, 1)), "main")
    assert [n.name for n in cluster.function_nodes()] == ["a", "b"]
    assert [n.name for n in Cluster.single("solo").function_nodes()] == ["solo"]
    functions = tuple(FunctionSpec(f"f{i}", ((0, i),), 0.5) for i in range(4))
    plan = Plan("p", MainSpec(1.0), frozenset(), functions)
    assert place_cold(plan, [1, 1, 1, 1], cluster) == [(0, "a"), (1, "b"), (2, "a"), (3, "b")]
    warm = (WarmInstance("w", frozenset({(1, 0)}), 1.0, "a"),)  # 1 GB already on a
    assert [node for _, node in place_cold(plan, [1, 1, 1, 1], cluster, warm)] == ["b", "b", "a", "b"]
    named = Plan("p", MainSpec(1.0), frozenset(), (FunctionSpec("f", ((0, 0),), 0.5, 2, ("b", "b")),))
    assert place_cold(named, [1], cluster) == [(0, "b")]  # the cold one is the second replica


def _burst_case(functions: int = 16):
    shape = small_shape(layers=2, experts=8)
    profiles = Profiles.synthetic(shape)
    cluster = Cluster((Node("main", "cpu", 64.0, 2), Node("a", "cpu", 32.0, 1), Node("b", "cpu", 32.0, 1)), "main")
    every = [(layer, e) for layer in range(2) for e in range(8)]
    experts = every[:functions]
    plan = Plan("burst", MainSpec(1.0), frozenset(every) - set(experts),
                tuple(FunctionSpec(f"L{layer}-E{e}", ((layer, e),), 0.5) for layer, e in experts))
    workload = Workload(32, 8)
    loads = Loads.from_forecast(Forecast.uniform(2, 8, workload.total_tokens, 2), workload, 2)
    return plan, loads, profiles, cluster, workload


def test_estimate_bills_init_of_a_burst_and_the_main_function_waits_for_it():
    plan, loads, profiles, cluster, workload = _burst_case()
    result = estimate(plan, loads, profiles, cluster, workload, main_warm=True)
    alone = float(profiles.init_s(profiles.shape.bytes_per_expert))
    # 8 cold starts per node: INIT stretched well beyond 16 lone INITs ...
    assert result.function_init_gb_s > 1.5 * 16 * alone * 0.5
    # ... and the main function's first token waits for the slowest layer-0 function: 8 forks per node.
    assert result.ttft_s > 8 * profiles.spawn_s + alone
    assert result.main_gb_s == pytest.approx(plan.main.memory_gb * result.wall_s)
    summary = result.summary()
    assert summary["functions_init_gb_s"] + summary["functions_busy_gb_s"] == pytest.approx(
        summary["functions_gb_s"], rel=1e-5)
    # Every instance warm: no INIT, nothing to wait for.
    warm = [WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "a") for f in plan.functions]
    hot = estimate(plan, loads, profiles, cluster, workload, warm=warm, main_warm=True)
    assert hot.function_init_gb_s == 0.0 and hot.ttft_s < 0.2 * result.ttft_s


def test_calls_are_billed_rounded_up_to_the_billing_grid():
    assert billed_call_s([0.0003, 0.001, 0.0012, 0.0], 0.001) == pytest.approx([0.001, 0.001, 0.002, 0.0])
    assert billed_call_s([0.0003], 0.0) == pytest.approx([0.0003])
    plan, loads, profiles, cluster, workload = _burst_case()
    exact = Cluster(cluster.nodes, "main", prices=Prices(round_s=0.0))
    coarse = Cluster(cluster.nodes, "main", prices=Prices(round_s=0.1))
    warm = [WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "a") for f in plan.functions]
    low = estimate(plan, loads, profiles, exact, workload, warm=warm, main_warm=True)
    high = estimate(plan, loads, profiles, coarse, workload, warm=warm, main_warm=True)
    calls_s = high.summary()["functions_busy_gb_s"] / 0.5 / 0.1  # every call billed 0.1 s
    assert calls_s == pytest.approx(high.invocations - 1.0, rel=1e-4)  # less the main's own request
    assert sum(low.function_gb_s.values()) < sum(high.function_gb_s.values())


def test_spawn_s_comes_from_the_measured_stages():
    profiles = Profiles.synthetic(small_shape())
    assert profiles.spawn_s > 0
    data = profiles.to_dict()
    assert Profiles.from_dict(data).spawn_s == profiles.spawn_s
    data["spawn_s"] = 0.0  # as `moemesh profile` stores it: the stages are in "measurement"
    data["measurement"] = {"cold_starts": [{"stages": {"spawn": s, "weights": 0.01}} for s in (0.01, 0.02, 0.05)]}
    assert Profiles.from_json(json.dumps(data)).spawn_s == pytest.approx(0.02)
    assert float(profiles.init_s(0)) == pytest.approx(profiles.cold_start.intercept - profiles.spawn_s)
    # the cgroup join ("limits") is INIT's fixed part: stored, else the measured median, else 0
    assert Profiles.from_json(json.dumps(data)).init_fixed_s == 0.0
    del data["init_fixed_s"]  # a profile stored before INIT was split: read from its measurement
    data["measurement"]["cold_starts"] = [{"stages": {"spawn": 0.02, "limits": v}} for v in (0.006, 0.012, 0.02)]
    read = Profiles.from_json(json.dumps(data))
    assert read.init_fixed_s == pytest.approx(0.012)
    assert float(read.init_s(0)) == pytest.approx(read.cold_start.intercept - read.spawn_s - 0.012)
    assert Profiles.from_dict(read.to_dict()).init_fixed_s == pytest.approx(0.012)
    with pytest.raises(ValueError, match="spawn_s"):
        Profiles(profiles.host, profiles.model, profiles.shape, profiles.expert, profiles.gpu_expert,
                 profiles.dense, profiles.cold_start, profiles.main_cold_start, profiles.scatter_gather,
                 spawn_s=-1.0)
    assert isinstance(profiles.cold_start, LinearModel)


def test_moeless_plans_only_what_the_function_nodes_hold(workload, slo, rng):
    """The mesh's cluster: a main host with no node daemon and two 8 GB nodes. One vCPU per
    function would need 32 x 1.025 GB: the functions shrink to fit, all on the two nodes."""
    shape = small_shape()
    profiles = Profiles.synthetic(shape)
    cluster = Cluster((Node("main", "cpu", 64.0, 2), Node("cpu0", "cpu", 8.0, 1), Node("cpu1", "cpu", 8.0, 1)),
                      "main")
    plan = moeless.plan(random_forecast(rng, shape, workload), profiles, slo, cluster, workload)
    assert {n for f in plan.functions for n in f.nodes} <= {"cpu0", "cpu1"}
    assert memory_problems(plan, profiles, cluster, workload) == []
    assert all(f.memory_gb < 1.0 for f in plan.functions)
