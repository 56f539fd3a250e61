"""moemesh is never worse than Remoe on the shared estimator, and uses what is already warm."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from allocator import moemesh, remoe
from allocator.cost import Loads, estimate
from allocator.model import SLO, ModelShape, WarmInstance
from allocator.profiles import Profiles

from .conftest import random_forecast


def key(plan, forecast, profiles, slo, cluster, workload, warm=()):
    """(SLO violation, hedged SLO violation, money): the order moemesh promises to improve."""
    loads = Loads.from_forecast(forecast, workload, profiles.shape.top_k)
    plain = estimate(plan, loads, profiles, cluster, workload, warm=warm)
    hedged = estimate(
        plan, loads.hedged(forecast.confidence), profiles, cluster, workload, warm=warm
    )
    return (round(plain.slo_violation(slo), 9), round(hedged.slo_violation(slo), 9), plain.money)


def test_moemesh_never_worse_than_remoe_on_synthetic_forecasts(
    shape, profiles, workload, gpu_cluster, cpu_cluster, rng
):
    rows = []
    for slo in (SLO(1.5, 0.05), SLO(1.5, 0.02)):
        for cluster in (gpu_cluster, cpu_cluster):
            for index in range(4):
                forecast = random_forecast(
                    rng, shape, workload, confidence=1.0 if index % 2 == 0 else None
                )
                ours = moemesh.plan(forecast, profiles, slo, cluster, workload)
                theirs = remoe.plan(forecast, profiles, slo, cluster, workload)
                ours_key = key(ours, forecast, profiles, slo, cluster, workload)
                theirs_key = key(theirs, forecast, profiles, slo, cluster, workload)
                assert ours_key <= theirs_key
                if forecast.confidence == 1.0 and theirs_key[0] == 0.0:
                    assert ours_key[2] <= theirs_key[2]
                rows.append(
                    (
                        cluster.main_node,
                        slo.tpot_s,
                        forecast.confidence,
                        theirs_key,
                        ours_key,
                        ours.params["start"],
                    )
                )
    print("\nmain  tpot   conf  remoe $      moemesh $    saving  start")
    for node, tpot, confidence, theirs_key, ours_key, start in rows:
        saving = 1 - ours_key[2] / theirs_key[2]
        print(
            f"{node:<5} {tpot:<6} {confidence:4.2f}  {theirs_key[2]:.3e}  {ours_key[2]:.3e}  {saving:6.1%}  {start}"
        )


def test_moemesh_on_a_larger_model_with_a_gpu_main(gpu_cluster, workload, rng):
    """8 layers x 16 experts of 17 MB: big enough that keeping every expert on the GPU costs."""
    shape = ModelShape.synthetic()
    profiles = Profiles.synthetic(shape)
    slo = SLO(2.0, 0.05)
    for _ in range(2):
        forecast = random_forecast(rng, shape, workload)
        ours = moemesh.plan(forecast, profiles, slo, gpu_cluster, workload, search_passes=1)
        theirs = remoe.plan(forecast, profiles, slo, gpu_cluster, workload)
        assert key(ours, forecast, profiles, slo, gpu_cluster, workload) <= key(
            theirs, forecast, profiles, slo, gpu_cluster, workload
        )


def test_moemesh_reuses_a_warm_instance(shape, profiles, workload, cpu_cluster, rng):
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    slo = SLO(1.5, 0.05)
    cold = moemesh.plan(forecast, profiles, slo, cpu_cluster, workload)
    layer_zero = next(f for f in cold.functions if f.experts[0][0] == 0)
    # A warm instance holding those experts at another size, kept alive by an earlier request:
    # 5 steps larger, so no INIT and no slower calls, against more GB per call-second; on this
    # forecast the saving wins. (Smaller would make the calls slower; the same size needs no
    # move: the estimator matches a warm instance by experts and memory, whatever its id.)
    other_size = round(layer_zero.memory_gb + 5 * cpu_cluster.grid.step_gb, 9)
    warm = (WarmInstance("warm-L0", frozenset(layer_zero.experts), other_size, "local"),)
    hot = moemesh.plan(forecast, profiles, slo, cpu_cluster, workload, warm=warm)
    assert "reuse warm-L0" in hot.params["moves"]
    reused = next(f for f in hot.functions if f.id == "warm-L0")
    assert set(reused.experts) == set(layer_zero.experts) and reused.memory_gb == other_size
    assert key(hot, forecast, profiles, slo, cpu_cluster, workload, warm) <= key(
        cold, forecast, profiles, slo, cpu_cluster, workload, warm
    )


def test_low_confidence_is_judged_on_hedged_loads_too(shape, profiles, workload, cpu_cluster):
    distribution = np.tile(
        np.array([0.6, 0.2, 0.1, 0.04, 0.03, 0.02, 0.005, 0.005]), (shape.moe_layers, 1)
    )
    from predictor.forecast import Forecast

    doubtful = Forecast(
        distribution, distribution * workload.total_tokens * shape.top_k, 0.2, (), "test"
    )
    plan = moemesh.plan(doubtful, profiles, SLO(1.5, 0.03), cpu_cluster, workload)
    assert "remoe-hedged" in plan.params["candidates"]
    assert plan.params["hedging"]["hoeffding_hedged"] > remoe.HOEFFDING_CONSTANT
    assert plan.params["key"][1] <= plan.params["remoe_key"][1]


def amortised_key(plan, forecast, profiles, slo, cluster, workload, reuse, warm=()):
    """key(), with money's INIT spread over `reuse` requests (moemesh's step 6)."""
    loads = Loads.from_forecast(forecast, workload, profiles.shape.top_k)
    plain = estimate(plan, loads, profiles, cluster, workload, warm=warm)
    violation, hedged, _ = key(plan, forecast, profiles, slo, cluster, workload, warm)
    return (violation, hedged, plain.amortised_money(reuse))


def test_cold_starts_are_judged_over_their_reuse(shape, profiles, workload, cpu_cluster, rng):
    """With reuse R the key's money spreads INIT over R requests: the chosen plan is never worse
    than any start candidate under that key, a reuse of 1 is the per-request judge of before,
    and the result records the reuse it was judged with."""
    from allocator import baselines, paper_baselines

    slo = SLO(1.5, 0.05)
    for _ in range(3):
        forecast = random_forecast(rng, shape, workload, confidence=1.0)
        starts = [
            remoe.plan(forecast, profiles, slo, cpu_cluster, workload),
            baselines.all_local(forecast, profiles, slo, cpu_cluster, workload),
            paper_baselines.cpu_only(forecast, profiles, slo, cpu_cluster, workload),
        ]
        for reuse in (1.0, 40.0):
            ours = moemesh.plan(forecast, profiles, slo, cpu_cluster, workload, reuse=reuse)
            assert ours.params["reuse"] == reuse
            mine = amortised_key(ours, forecast, profiles, slo, cpu_cluster, workload, reuse)
            assert tuple(ours.params["key"]) == mine
            for start in starts:
                assert mine <= amortised_key(start, forecast, profiles, slo, cpu_cluster, workload, reuse)
        assert moemesh.plan(forecast, profiles, slo, cpu_cluster, workload).params["reuse"] == 1.0
    with pytest.raises(ValueError, match="reuse"):
        moemesh.plan(forecast, profiles, slo, cpu_cluster, workload, reuse=0.5)


def warm_of(plan) -> tuple[WarmInstance, ...]:
    return tuple(WarmInstance(f.id, frozenset(f.experts), f.memory_gb, "local") for f in plan.functions
                 for _ in range(f.replicas))


def test_the_plan_in_force_is_a_candidate(shape, profiles, workload, cpu_cluster, rng):
    """At a re-plan the running layout, its instances warm, is judged beside the fresh starts:
    the result is never worse than keeping it, and when the forecast only swaps which expert of
    a layer is hottest (Azure-trace runs on the Qwen shapes re-shaped a function at every
    re-plan for that), no new instance is started."""
    slo = SLO(1.5, 0.05)
    for _ in range(3):
        forecast = random_forecast(rng, shape, workload, confidence=1.0)
        first = moemesh.plan(forecast, profiles, slo, cpu_cluster, workload)
        warm = warm_of(first)
        distribution = forecast.distribution.copy()
        hottest = distribution.argsort(axis=1)[:, -2:]
        for layer, (second, top) in enumerate(hottest):
            distribution[layer, [second, top]] = distribution[layer, [top, second]]
        swapped = replace(forecast, distribution=distribution, load=distribution * forecast.load.sum(axis=1, keepdims=True))
        again = moemesh.plan(swapped, profiles, slo, cpu_cluster, workload, warm=warm, in_force=first)
        assert "in-force" in again.params["candidates"]
        kept = moemesh._kept(first, swapped, profiles, cpu_cluster, workload)
        assert tuple(again.params["key"]) <= amortised_key(kept, swapped, profiles, slo, cpu_cluster, workload, 1.0, warm)
        loads = Loads.from_forecast(swapped, workload, shape.top_k)
        assert estimate(again, loads, profiles, cpu_cluster, workload, warm=warm).function_init_gb_s == 0.0


def test_reusing_a_warm_instance_renames_the_function_left_under_its_id(shape, profiles, workload, cpu_cluster, rng):
    """A warm instance named like a planned function that holds other experts too is reused; the
    rest of that function takes a fresh id (it used to block the reuse)."""
    forecast = random_forecast(rng, shape, workload, confidence=1.0)
    plan = paper_baselines_cpu_only(forecast, profiles, cpu_cluster, workload)
    layer_zero = next(f for f in plan.functions if f.experts[0][0] == 0)
    instance = WarmInstance(layer_zero.id, frozenset(layer_zero.experts[1:]), layer_zero.memory_gb, "local")
    search = moemesh._Search(moemesh._Judge(forecast, profiles, SLO(1.5, 0.05), cpu_cluster, workload, (instance,)),
                             profiles, cpu_cluster, workload, forecast.distribution, 64.0)
    carved = search.reuse_warm(plan, instance)
    assert carved is not None
    carved.validate(shape.moe_layers, shape.experts_per_layer)
    reused = next(f for f in carved.functions if f.id == layer_zero.id)
    assert set(reused.experts) == set(instance.experts)
    rest = [f for f in carved.functions if layer_zero.experts[0] in f.experts]
    assert len(rest) == 1 and rest[0].id != layer_zero.id


def paper_baselines_cpu_only(forecast, profiles, cluster, workload):
    from allocator import paper_baselines

    return paper_baselines.cpu_only(forecast, profiles, SLO(1.5, 0.05), cluster, workload)
