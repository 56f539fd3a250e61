"""Baseline policies: the fixed points every smarter policy is measured against.

Each is ``name(forecast, profiles, slo, cluster, workload, *, warm=(), ...) -> Plan``; none
uses ``warm`` (they are not locality-aware) and none uses ``slo`` to decide (they record it).

- :func:`all_local`: serverful. Every expert resident in the main function, computed on the
  main device (``local_experts_device="main"``): Remoe's "GPU-only" baseline on a GPU main
  node, "CPU-only" on a CPU one (PAPERS.md 1.6).
- :func:`all_remote`: LambdaML-like (Liu et al's baseline, PAPERS.md 2.5): one function per
  expert, every function at one fixed size (default: the grid maximum, as LambdaML's 3008 MB
  was Lambda's maximum), no replicas, no prediction.
- :func:`static_split`: a fixed list of remote experts, one function per layer holding that
  layer's remote experts (Remoe's layout without its sizing), fixed size (default 1 GB =
  one vCPU), split into several functions only when the experts do not fit the largest size.
- :func:`mix`: Remoe's MIX baseline (PAPERS.md 1.6: "experts on CPU, rest on GPU, all
  resident", akin to Fiddler). Our reading: one serverful main function on the main node's
  device holding every expert in *host* memory and computing them on its CPU share
  (``local_experts_device="cpu"``), billed ``c_gpu`` for the non-expert part and ``c_cpu``
  for the experts, exactly Remoe's ``C_loc`` with no remote experts. We did not read it as
  "one CPU function per layer": MIX has no network hop and no scale-to-zero, which a
  per-layer function would add. On a CPU main node MIX equals all_local.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from allocator.cost import annotate
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.plan import Expert, FunctionSpec, MainSpec, Plan
from allocator.profiles import Profiles
from allocator.sizing import (
    check_inputs,
    experts_fitting,
    forecast_summary,
    function_required_gb,
    main_memory_gb,
)
from predictor.forecast import Forecast


def _every_expert(profiles: Profiles) -> list[Expert]:
    shape = profiles.shape
    return [(layer, e) for layer in range(shape.moe_layers) for e in range(shape.experts_per_layer)]


def _finish(
    policy, main, local, functions, params, forecast, profiles, cluster, workload, warm
) -> Plan:
    result = Plan(policy, main, frozenset(local), tuple(functions), params=params)
    result.validate(profiles.shape.moe_layers, profiles.shape.experts_per_layer)
    return annotate(result, forecast, profiles, cluster, workload, warm=warm)


def _resident(
    policy: str,
    device_of_experts: str,
    reason: str,
    forecast,
    profiles,
    slo,
    cluster,
    workload,
    warm,
) -> Plan:
    check_inputs(forecast, profiles, workload)
    local = _every_expert(profiles)
    main = MainSpec(main_memory_gb(len(local), profiles, cluster, workload), cluster.main.kind)
    params = {
        "forecast": forecast_summary(forecast),
        "local_experts_device": device_of_experts,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "reason": reason,
    }
    return _finish(policy, main, local, (), params, forecast, profiles, cluster, workload, warm)


def all_local(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
) -> Plan:
    """Serverful: every expert in the main function, on the main device."""
    return _resident(
        "all-local",
        "main",
        "serverful: every expert resident in the main function, on its device",
        forecast,
        profiles,
        slo,
        cluster,
        workload,
        warm,
    )


def mix(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
) -> Plan:
    """Remoe's MIX: non-expert parts on the main device, every expert resident in host memory."""
    return _resident(
        "mix",
        "cpu",
        "Remoe MIX: experts resident on the main function's CPU, the rest on its device",
        forecast,
        profiles,
        slo,
        cluster,
        workload,
        warm,
    )


def all_remote(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    memory_gb: float | None = None,
    replicas: int = 1,
) -> Plan:
    """One function per expert at one fixed size (default the grid maximum), ``replicas``
    instances each (default 1: LambdaML has none)."""
    check_inputs(forecast, profiles, workload)
    grid = cluster.grid
    size = grid.round_down(grid.maximum_gb) if memory_gb is None else grid.round_up(memory_gb)
    need = function_required_gb([(0, 0)], profiles, workload)
    if size < need:
        raise ValueError(f"all-remote: {size} GB < {need:.3f} GB one expert needs")
    functions = [
        FunctionSpec(f"L{layer}-E{e}", ((layer, e),), size, replicas) for layer, e in _every_expert(profiles)
    ]
    main = MainSpec(main_memory_gb(0, profiles, cluster, workload), cluster.main.kind)
    params = {
        "forecast": forecast_summary(forecast),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "function_memory_gb": size,
        "reason": "LambdaML-like: one function per expert, fixed size, no replicas",
    }
    return _finish(
        "all-remote", main, (), functions, params, forecast, profiles, cluster, workload, warm
    )


def static_split(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    remote: Iterable[Expert],
    warm: Sequence[WarmInstance] = (),
    memory_gb: float = 1.0,
    replicas: int = 1,
) -> Plan:
    """The given ``remote`` experts in one function per layer (``memory_gb``, or more if needed),
    ``replicas`` instances of each."""
    check_inputs(forecast, profiles, workload)
    shape, grid = profiles.shape, cluster.grid
    chosen = [(int(layer), int(e)) for layer, e in remote]
    if len(set(chosen)) != len(chosen):
        raise ValueError("static-split: duplicate experts in remote")
    bad = [
        x
        for x in chosen
        if not (0 <= x[0] < shape.moe_layers and 0 <= x[1] < shape.experts_per_layer)
    ]
    if bad:
        raise ValueError(f"static-split: experts outside the model: {bad[:4]}")
    by_layer: dict[int, list[Expert]] = defaultdict(list)
    for expert in sorted(chosen):
        by_layer[expert[0]].append(expert)
    functions = []
    for layer, experts in sorted(by_layer.items()):
        need = function_required_gb(experts, profiles, workload)
        if need <= grid.maximum_gb:
            size = grid.round_up(max(need, memory_gb))
            functions.append(FunctionSpec(f"L{layer}-r0", tuple(experts), size, replicas))
            continue
        size = grid.round_down(grid.maximum_gb)
        per_function = experts_fitting(size, profiles, workload)
        if per_function < 1:
            raise ValueError(f"static-split: one expert does not fit {size} GB")
        for part in range(math.ceil(len(experts) / per_function)):
            chunk = experts[part * per_function : (part + 1) * per_function]
            functions.append(FunctionSpec(f"L{layer}-r{part}", tuple(chunk), size, replicas))
    local = set(_every_expert(profiles)) - set(chosen)
    main = MainSpec(main_memory_gb(len(local), profiles, cluster, workload), cluster.main.kind)
    params = {
        "forecast": forecast_summary(forecast),
        "local_experts_device": "cpu",
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "remote_count": len(chosen),
        "reason": "fixed remote set, one function per layer",
    }
    return _finish(
        "static-split", main, local, functions, params, forecast, profiles, cluster, workload, warm
    )
