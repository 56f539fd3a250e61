"""Allocator: turns a forecast of expert activations into a :class:`~allocator.plan.Plan`.

Every policy is ``plan(forecast, profiles, slo, cluster, workload, *, warm=(), **options)``
(see allocator.model for the arguments). ``POLICIES`` names them; ``make_plan`` calls one.
"""

from __future__ import annotations

from collections.abc import Callable

from allocator import baselines, bayesian, moeless, moemesh, remoe
from allocator.model import SLO, Cluster, Workload
from allocator.plan import Plan
from allocator.profiles import Profiles
from predictor.forecast import Forecast

POLICIES: dict[str, Callable[..., Plan]] = {
    "all-local": baselines.all_local,
    "all-remote": baselines.all_remote,
    "static-split": baselines.static_split,
    "mix": baselines.mix,
    "remoe": remoe.plan,
    "moeless": moeless.plan,
    "bayesian": bayesian.plan,
    "moemesh": moemesh.plan,
}


def make_plan(
    name: str,
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    **options,
) -> Plan:
    """Run policy ``name`` (a key of POLICIES) with its keyword ``options``."""
    if name not in POLICIES:
        raise KeyError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](forecast, profiles, slo, cluster, workload, **options)
