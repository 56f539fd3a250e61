"""moemesh re-plans only when the re-plan can pay for itself (mesh.planning.replan_skip_reason):
the planner runs in the main function, so its time is billed there."""

from __future__ import annotations

import pytest

import allocator
from allocator.cost import Loads, estimate
from allocator.model import SLO, Cluster, Workload
from allocator.profiles import Profiles
from allocator.sizing import main_memory_gb
from mesh import planning
from predictor.forecast import Forecast
from tests.allocator.conftest import small_shape

WORKLOAD = Workload(prompt_tokens=64, new_tokens=16)
LOOSE = (1e9, 1e9)  # an SLO every plan meets


def setup(policy: str):
    shape = small_shape()
    profiles = Profiles.synthetic(shape)
    cluster = Cluster.single("local", "cpu", capacity_gb=64.0, cpus=16)
    forecast = Forecast.uniform(shape.moe_layers, shape.experts_per_layer, WORKLOAD.total_tokens, shape.top_k)
    plan = allocator.make_plan(policy, forecast, profiles, SLO(ttft_s=1e9, tpot_s=1e9), cluster, WORKLOAD)
    loads = Loads.from_forecast(forecast, WORKLOAD, shape.top_k)
    figures = estimate(plan, loads, profiles, cluster, WORKLOAD, main_warm=True).summary()
    return plan, profiles, cluster, figures


def test_a_plan_at_the_floor_is_kept_when_planning_costs_more_than_it_could_save():
    plan, profiles, cluster, figures = setup("all-local")
    floor = main_memory_gb(0, profiles, cluster, WORKLOAD)
    headroom = figures["main_gb_s"] * (1 - floor / plan.main.memory_gb)
    assert headroom > 0  # the experts held locally are what a re-plan could save
    slow = 1.01 * headroom / plan.main.memory_gb  # planning a hair dearer than the headroom
    reason = planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, LOOSE, slow)
    assert reason and "kept the plan in force" in reason
    fast = 0.99 * headroom / plan.main.memory_gb
    assert planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, LOOSE, fast) is None


def test_functions_billing_more_than_planning_costs_are_re_planned_for():
    plan, profiles, cluster, figures = setup("all-remote")
    assert figures["functions_gb_s"] > 0
    slow = 0.9 * figures["functions_gb_s"] / plan.main.memory_gb
    assert planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, LOOSE, slow) is None


def test_an_slo_the_plan_in_force_misses_and_an_untimed_planner_always_re_plan():
    plan, profiles, cluster, figures = setup("all-local")
    never_worth_it = 1e9
    assert planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, LOOSE, never_worth_it)
    tight = (figures["ttft_s"] / 2, 1e9)
    assert planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, tight, never_worth_it) is None
    assert planning.replan_skip_reason(figures, plan, profiles, cluster, WORKLOAD, LOOSE, None) is None
    assert planning.replan_skip_reason(None, plan, profiles, cluster, WORKLOAD, LOOSE, never_worth_it) is None


def test_expected_reuse_is_the_poisson_run_of_warm_arrivals_capped_by_the_stream_so_far():
    import math

    assert planning.expected_reuse([], 30.0) == 1.0  # nothing seen yet: the request alone
    assert planning.expected_reuse([5.0], 30.0) == 1.0
    assert planning.expected_reuse([0.0, 0.0], 30.0) == 1.0  # no span to take a rate over
    assert planning.expected_reuse([0.0, 1.0, 2.0, 4.0], 0.0) == 1.0  # keep-alive none: every start is used once
    # 3 gaps over 40 s and a 10 s keep-alive: a gap beyond it comes with chance exp(-0.75)
    sparse = [0.0, 10.0, 25.0, 40.0]
    assert planning.expected_reuse(sparse, 10.0, seen=100) == pytest.approx(math.exp(0.75))
    assert planning.expected_reuse(sparse, 10.0) == pytest.approx(math.exp(0.75))  # below the 4 seen
    dense = [0.0, 1.0, 2.0, 4.0]  # 0.75 requests/s and 30 s: exp(22.5), capped by the stream so far
    assert planning.expected_reuse(dense, 30.0) == 4.0
    assert planning.expected_reuse(dense, 30.0, seen=40) == 40.0


def test_a_plan_is_made_for_the_slo_class_of_the_request_it_is_made_for():
    """The coordinator re-plans for a request under that request's SLO class (a batch request
    on a host where nothing meets the interactive SLO must not be planned as the fastest plan
    whatever its cost): make_plan takes the class, and without one uses [slo] default_class."""
    from mesh.config import load_config
    from nodes.model.config import MoEConfig

    config = load_config(None, {"policy.name": "all-local"})
    model = MoEConfig.from_file(config.model.resolved_path())
    profiles = Profiles.synthetic(planning.model_shape(model))
    for slo_class in config.slo.classes:
        plan = planning.make_plan(config, model, profiles=profiles, slo_class=slo_class)
        target = config.slo.classes[slo_class]
        assert plan.params["slo"] == {"ttft_s": target.ttft_s, "tpot_s": target.tpot_s}
    default = config.slo.classes[config.slo.default_class]
    assert planning.make_plan(config, model, profiles=profiles).params["slo"]["ttft_s"] == default.ttft_s
    assert len({c.ttft_s for c in config.slo.classes.values()}) > 1  # the classes differ: the test can fail


def test_moemesh_is_handed_the_plan_in_force_and_its_warm_instances():
    """The coordinator's re-plan passes the plan in force (planning.make_plan in_force=): moemesh
    judges it as a candidate with its warm instances and, with nothing changed, keeps it."""
    from allocator.model import WarmInstance
    from mesh.config import load_config
    from nodes.model.config import MoEConfig

    config = load_config(None, {"policy.name": "moemesh"})
    model = MoEConfig.from_file(config.model.resolved_path())
    profiles = Profiles.synthetic(planning.model_shape(model))
    first = planning.make_plan(config, model, profiles=profiles)
    warm = [WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "") for f in first.functions]
    again = planning.make_plan(config, model, profiles=profiles, warm=warm, in_force=first)
    assert "in-force" in again.params["candidates"]
    assert "in-force" not in first.params["candidates"]
    assert (again.local, {(f.id, f.experts, f.memory_gb) for f in again.functions}) == (
        first.local, {(f.id, f.experts, f.memory_gb) for f in first.functions})
