"""render_plan: the text table a `moemesh plan --policy X` command will print."""

from __future__ import annotations

from allocator import make_plan
from allocator.render import render_plan

from .conftest import random_forecast


def test_render_plan_lists_main_local_functions_and_estimate(
    shape, profiles, slo, workload, gpu_cluster, rng
):
    forecast = random_forecast(rng, shape, workload)
    for name in ("remoe", "moeless", "all-local"):
        plan = make_plan(name, forecast, profiles, slo, gpu_cluster, workload)
        text = render_plan(plan, shape)
        print(f"\n{text}")
        assert f"plan {name}" in text
        assert f"main: {plan.main.memory_gb:.3f} GB" in text
        assert all(f"L{layer} " in text for layer in range(shape.moe_layers))
        assert all(f.id in text for f in plan.functions)
        assert "estimate: TTFT" in text and "GB-s" in text
