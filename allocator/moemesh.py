"""moemesh's own policy: Remoe's split and sizing, polished on the shared estimator.

Entry point: :func:`plan`. What it adds to Remoe (allocator.remoe), in order:

1. **Confidence-aware hedging.** A forecast of confidence c is also judged under *hedged*
   loads, each layer blended toward uniform by 1 - c (``Loads.hedged``): the experts Remoe
   sends away as cold may turn out warmer. Candidates are ranked by the lexicographic key
   (SLO violation under the forecast, SLO violation under the hedged loads, money under the
   forecast). A second Remoe candidate is built from the hedged forecast with a wider
   worst-case constant ``hoeffding * (2 - c)``, which keeps more experts local when c is low.
2. **Best start.** Candidates: Remoe, hedged Remoe, MIX (every expert resident on the main
   function's CPU), all-local and Remoe's CPU-only layout (every expert remote, one function
   per layer at one vCPU or more: where experts dominate memory and the main function is billed
   while it waits, a small main beats every split the utility ranking makes); the best key wins.
3. **Keep-alive reuse.** A warm instance whose experts the plan serves remotely (or locally)
   in one layer is carved out into a function reusing it (same id, experts, memory, node):
   no cold start, no INIT. Kept only when the key improves; tried again after step 5.
4. **Straggler replication where TTFT is tight.** When the estimated TTFT exceeds
   ``tight_ttft`` (0.9) x the SLO, the most loaded function of the slowest prefill layers
   gets one more replica (MoEless-style, tokens split evenly) while the key improves.
5. **Local search.** Per layer: remote memory one grid step up or down; the hottest remote
   expert back to the main function; the coldest local expert out to the layer's least
   loaded function; main memory one step down. Each move is kept only when the key
   improves; ``search_passes`` passes.

6. **The plan in force stays a candidate.** At a re-plan the layout now running (``in_force``)
   is judged beside the fresh starts, its warm instances costing no INIT: a new layout must
   pay for its own cold starts within the reuse below. Without it, the search started from a
   fresh layout every time and re-shaped a function whenever the forecast's hottest expert of a
   layer moved (Azure-trace run on the Qwen shapes: 12 cold starts against CPU-only's 4, and
   the main waiting for them).
7. **Cold starts amortised over their reuse.** A candidate's cold replicas are judged against
   the instances warm now, so a layout unlike the plan in force pays every function's INIT on
   this one request; but the instances it starts serve the requests that follow while they
   stay warm. The key's money spreads INIT over ``reuse`` requests (the caller's estimate:
   exp(arrival rate x keep-alive), the mean run of arrivals that find an instance warm, at most
   the requests seen so far; mesh.planning.expected_reuse), so a layout that is
   cheaper per request wins once its switch pays within that horizon, and an idle mesh
   (reuse 1) judges every switch on the one request, as before.

8. **A re-plan starts from the main function as it is.** At a re-plan the main is up and holds
   the plan in force's local experts; a candidate that keeps more local loads them before the
   prefill (on the TTFT, billed), one that keeps fewer loads nothing. Judged as a cold main
   instead, every candidate paid a main start-up it would not have (the unmeasured default:
   the all-local one 3.3 s, the plan in force's 1.2 s) rather than the loads it needs (5.3 s for
   all-local's 239 Qwen experts at the cold-start slope), and all-local won (request 1 of a Qwen
   replay: TTFT 13 s, then dropped them at request 2).

Every step keeps a plan only when its key is strictly better, and Remoe's own plan is a
candidate, so the result's key is never worse than Remoe's on the estimator (tested in
tests/allocator/test_moemesh.py). With confidence 1 the hedged loads equal the forecast,
so the result is no more expensive than Remoe whenever Remoe meets the SLOs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from allocator import baselines, paper_baselines, remoe
from allocator.cost import Loads, annotate, estimate
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import Profiles
from allocator.sizing import check_inputs, forecast_summary, function_required_gb, main_required_gb
from predictor.forecast import Forecast

Key = tuple[float, float, float]


def _better(new: Key, old: Key) -> bool:
    """Strictly better: lower violation first, then lower money (by more than a rounding hair)."""
    if new[0] != old[0]:
        return new[0] < old[0]
    if new[1] != old[1]:
        return new[1] < old[1]
    return new[2] < old[2] * (1 - 1e-9)


class _Judge:
    """The key of a plan: (SLO violation, hedged SLO violation, money); counts its calls.

    Money is the request's with its cold starts' INIT spread over ``reuse`` requests (step 6
    of the module docstring)."""

    def __init__(self, forecast, profiles, slo, cluster, workload, warm, reuse: float = 1.0,
                 main_held=None) -> None:
        top_k = profiles.shape.top_k
        self.loads = Loads.from_forecast(forecast, workload, top_k)
        self.hedged = self.loads.hedged(forecast.confidence)
        self.same = forecast.confidence >= 1.0
        self.args = (profiles, cluster, workload)
        self.slo, self.warm, self.reuse = slo, tuple(warm), float(reuse)
        self.main_held = None if main_held is None else frozenset(map(tuple, main_held))
        self.calls = 0

    def __call__(self, plan: Plan) -> Key:
        self.calls += 1
        result = estimate(plan, self.loads, *self.args, warm=self.warm, main_held=self.main_held)
        violation = round(result.slo_violation(self.slo), 9)
        hedged = (
            violation
            if self.same
            else round(
                estimate(plan, self.hedged, *self.args, warm=self.warm, main_held=self.main_held)
                .slo_violation(self.slo), 9
            )
        )
        return (float(violation), float(hedged), float(result.amortised_money(self.reuse)))


def _layer_functions(plan: Plan, layer: int) -> list[int]:
    return [i for i, f in enumerate(plan.functions) if all(e[0] == layer for e in f.experts)]


def _fresh_id(plan: Plan, layer: int) -> str:
    taken = {f.id for f in plan.functions}
    index = 0
    while f"L{layer}-r{index}" in taken:
        index += 1
    return f"L{layer}-r{index}"


class _Search:
    """Greedy improvement of one plan under a judge; each move returns a candidate or None."""

    def __init__(
        self,
        judge: _Judge,
        profiles: Profiles,
        cluster: Cluster,
        workload: Workload,
        distribution: np.ndarray,
        ceiling_gb: float,
    ):
        self.judge, self.profiles, self.cluster, self.workload = judge, profiles, cluster, workload
        self.distribution, self.ceiling = distribution, ceiling_gb
        self.moves: list[str] = []

    def try_move(
        self, current: tuple[Plan, Key], candidate: Plan | None, label: str
    ) -> tuple[Plan, Key]:
        if candidate is None:
            return current
        key = self.judge(candidate)
        if _better(key, current[1]):
            self.moves.append(label)
            return candidate, key
        return current

    def _required(self, experts) -> float:
        return function_required_gb(experts, self.profiles, self.workload)

    def _main_for(self, plan: Plan, local_count: int) -> MainSpec | None:
        return _main_holding(plan, local_count, self.profiles, self.cluster, self.workload)

    def resize_layer(self, plan: Plan, layer: int, steps: int) -> Plan | None:
        grid = self.cluster.grid
        indices = _layer_functions(plan, layer)
        if not indices:
            return None
        functions = list(plan.functions)
        for i in indices:
            f = functions[i]
            size = round(f.memory_gb + steps * grid.step_gb, 9)
            if (
                size < self._required(f.experts) - 1e-9
                or size > self.ceiling + 1e-9
                or size < grid.minimum_gb
            ):
                return None
            functions[i] = replace(f, memory_gb=size)
        return replace(plan, functions=tuple(functions))

    def hottest_remote_home(self, plan: Plan, layer: int) -> Plan | None:
        indices = _layer_functions(plan, layer)
        remote = [
            (self.distribution[layer, e], i, (lay, e))
            for i in indices
            for lay, e in plan.functions[i].experts
        ]
        if not remote:
            return None
        _, index, expert = max(remote)
        main = self._main_for(plan, len(plan.local) + 1)
        if main is None:
            return None
        functions = list(plan.functions)
        rest = tuple(e for e in functions[index].experts if e != expert)
        if rest:
            functions[index] = replace(functions[index], experts=rest)
        else:
            functions.pop(index)
        return replace(plan, main=main, local=plan.local | {expert}, functions=tuple(functions))

    def coldest_local_out(self, plan: Plan, layer: int) -> Plan | None:
        local = [(self.distribution[layer, e], (lay, e)) for lay, e in plan.local if lay == layer]
        if not local:
            return None
        _, expert = min(local)
        functions = list(plan.functions)
        indices = _layer_functions(plan, layer)
        if indices:
            index = min(
                indices,
                key=lambda i: (
                    sum(self.distribution[layer, e] for _, e in functions[i].experts),
                    i,
                ),
            )
            f = functions[index]
            experts = tuple(sorted(f.experts + (expert,)))
            need = self._required(experts)
            if need > self.ceiling + 1e-9:
                return None
            functions[index] = replace(
                f, experts=experts, memory_gb=max(f.memory_gb, self.cluster.grid.round_up(need))
            )
        else:
            need = self._required([expert])
            if need > self.ceiling + 1e-9:
                return None
            functions.append(
                FunctionSpec(
                    _fresh_id(plan, layer),
                    (expert,),
                    self.cluster.grid.round_up(max(need, self.ceiling)),
                )
            )
        local_set = plan.local - {expert}
        need_main = main_required_gb(len(local_set), self.profiles, self.workload)
        main = MainSpec(
            max(self.cluster.grid.round_up(need_main), plan.main.memory_gb), plan.main.device
        )
        return replace(plan, main=main, local=local_set, functions=tuple(functions))

    def shrink_main(self, plan: Plan) -> Plan | None:
        grid = self.cluster.grid
        size = round(plan.main.memory_gb - grid.step_gb, 9)
        if (
            size < main_required_gb(len(plan.local), self.profiles, self.workload) - 1e-9
            or size < grid.minimum_gb
        ):
            return None
        return replace(plan, main=MainSpec(size, plan.main.device))

    def add_replica(self, plan: Plan, index: int, max_replicas: int) -> Plan | None:
        f = plan.functions[index]
        if f.replicas >= max_replicas:
            return None
        functions = list(plan.functions)
        functions[index] = replace(f, replicas=f.replicas + 1, nodes=())
        return replace(plan, functions=tuple(functions))

    def reuse_warm(self, plan: Plan, instance: WarmInstance) -> Plan | None:
        """Carve ``instance``'s experts (one layer) out of the plan into a function reusing it; a
        function left with other experts under the instance's id takes a fresh id."""
        wanted = set(instance.experts)
        if len({e[0] for e in wanted}) != 1 or instance.memory_gb < self._required(wanted) - 1e-9:
            return None
        for f in plan.functions:
            if (
                f.id == instance.function_id
                and set(f.experts) == wanted
                and abs(f.memory_gb - instance.memory_gb) < 1e-9
            ):
                return None  # already reused
        functions = [
            replace(f, experts=rest)
            for f in plan.functions
            if (rest := tuple(e for e in f.experts if e not in wanted))
        ]
        functions = [
            replace(f, id=_fresh_id(plan, f.experts[0][0])) if f.id == instance.function_id else f
            for f in functions
        ]
        nodes = (instance.node,) if instance.node else ()
        functions.append(
            FunctionSpec(instance.function_id, tuple(sorted(wanted)), instance.memory_gb, 1, nodes)
        )
        return replace(plan, local=plan.local - wanted, functions=tuple(functions))


def _main_holding(
    plan: Plan, local_count: int, profiles: Profiles, cluster: Cluster, workload: Workload
) -> MainSpec | None:
    """``plan``'s main grown to hold ``local_count`` experts and this workload (never shrunk;
    None when the main node cannot)."""
    need = main_required_gb(local_count, profiles, workload)
    if need > cluster.main.capacity_gb:
        return None
    memory = max(plan.main.memory_gb, cluster.grid.round_up(need, maximum_gb=cluster.main.capacity_gb))
    return MainSpec(memory, plan.main.device)


def _kept(in_force: Plan, forecast: Forecast, profiles: Profiles, cluster: Cluster, workload: Workload) -> Plan:
    """The plan in force as a candidate for this request: its layout unchanged, its main grown
    to the memory this workload needs (ValueError when its main node or a function's memory
    cannot hold this workload: then a fresh layout must serve it)."""
    main = _main_holding(in_force, len(in_force.local), profiles, cluster, workload)
    if main is None:
        raise ValueError("moemesh: the plan in force's main cannot hold this workload")
    short = [f.id for f in in_force.functions if f.memory_gb < function_required_gb(f.experts, profiles, workload) - 1e-9]
    if short:
        raise ValueError(f"moemesh: functions {short} of the plan in force are too small for this workload")
    params = {
        "forecast": forecast_summary(forecast),
        "kept": f"the {in_force.policy} plan in force",
        "local_experts_device": in_force.params.get("local_experts_device", "cpu"),
    }
    return replace(in_force, policy="moemesh", main=main, params=params)


def plan(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    hoeffding: float = remoe.HOEFFDING_CONSTANT,
    eta: float = 0.1,
    max_replicas: int = 8,
    tight_ttft: float = 0.9,
    search_passes: int = 2,
    reuse: float = 1.0,
    in_force: Plan | None = None,
    main_held=None,
) -> Plan:
    """moemesh's plan (module docstring): never worse than Remoe's under the estimator's key.

    in_force: the plan the mesh runs now, judged as a candidate with the ``warm`` instances
    (step 6); None at start-up. main_held: the experts the main function holds now (a re-plan):
    each candidate pays the loads of the local experts it lacks instead of a main cold start
    (step 8); None: the main starts cold with the plan."""
    check_inputs(forecast, profiles, workload)
    if search_passes < 0 or not 0 < tight_ttft <= 1 or not reuse >= 1:
        raise ValueError("moemesh: need search_passes >= 0, 0 < tight_ttft <= 1 and reuse >= 1")
    shape = profiles.shape
    judge = _Judge(forecast, profiles, slo, cluster, workload, warm, reuse, main_held)
    confidence = float(forecast.confidence)
    options = {"hoeffding": hoeffding, "eta": eta, "max_replicas": max_replicas}

    builders: dict[str, Callable[[], Plan]] = {
        "remoe": lambda: remoe.plan(forecast, profiles, slo, cluster, workload, **options),
        "mix": lambda: baselines.mix(forecast, profiles, slo, cluster, workload),
        "all-local": lambda: baselines.all_local(forecast, profiles, slo, cluster, workload),
        "cpu-only": lambda: paper_baselines.cpu_only(forecast, profiles, slo, cluster, workload),
    }
    if confidence < 1.0:
        uniform = np.full_like(forecast.distribution, 1.0 / shape.experts_per_layer)
        hedged = replace(
            forecast, distribution=confidence * forecast.distribution + (1 - confidence) * uniform
        )
        wider = dict(options, hoeffding=hoeffding * (2.0 - confidence))
        builders["remoe-hedged"] = lambda: remoe.plan(
            hedged, profiles, slo, cluster, workload, **wider
        )
    if in_force is not None:
        builders["in-force"] = lambda: _kept(in_force, forecast, profiles, cluster, workload)
    candidates: dict[str, tuple[Plan, Key]] = {}
    for name, build in builders.items():
        try:
            candidate = build()
        except ValueError:  # e.g. the main node cannot hold every expert
            continue
        candidates[name] = (candidate, judge(candidate))
    if not candidates:
        raise ValueError("moemesh: no candidate plan fits the cluster")
    start = min(
        candidates, key=lambda n: (candidates[n][1][0], candidates[n][1][1], candidates[n][1][2])
    )
    best = candidates[start]
    remoe_key = candidates["remoe"][1] if "remoe" in candidates else None
    ceiling = remoe.remote_ceiling_gb(profiles, cluster, None)
    search = _Search(
        judge, profiles, cluster, workload, np.asarray(forecast.distribution, dtype=float), ceiling
    )

    for instance in warm:
        best = search.try_move(
            best, search.reuse_warm(best[0], instance), f"reuse {instance.function_id}"
        )

    estimate_now = estimate(best[0], judge.loads, profiles, cluster, workload, warm=judge.warm,
                            main_held=judge.main_held)
    if estimate_now.ttft_s > tight_ttft * slo.ttft_s:
        for layer in np.argsort(-np.array(estimate_now.layer_prefill_s), kind="stable"):
            for _ in range(max_replicas):
                indices = _layer_functions(best[0], int(layer))
                if not indices:
                    break
                load = [
                    sum(forecast.distribution[layer, e] for _, e in best[0].functions[i].experts)
                    / best[0].functions[i].replicas
                    for i in indices
                ]
                index = indices[int(np.argmax(load))]
                before = best
                best = search.try_move(
                    best,
                    search.add_replica(best[0], index, max_replicas),
                    f"replicate {best[0].functions[index].id}",
                )
                if best is before:
                    break

    for _ in range(search_passes):
        moves_before = len(search.moves)
        for layer in range(shape.moe_layers):
            best = search.try_move(
                best, search.resize_layer(best[0], layer, +1), f"L{layer} memory +1 step"
            )
            best = search.try_move(
                best, search.resize_layer(best[0], layer, -1), f"L{layer} memory -1 step"
            )
            best = search.try_move(
                best,
                search.hottest_remote_home(best[0], layer),
                f"L{layer} hottest remote -> local",
            )
            best = search.try_move(
                best, search.coldest_local_out(best[0], layer), f"L{layer} coldest local -> remote"
            )
        best = search.try_move(best, search.shrink_main(best[0]), "main memory -1 step")
        if len(search.moves) == moves_before:
            break

    for instance in warm:  # again: the search may have shaped a function like a warm one
        best = search.try_move(
            best, search.reuse_warm(best[0], instance), f"reuse {instance.function_id}"
        )

    chosen, key = best
    start_record = {
        k: v for k, v in candidates[start][0].params.items() if k not in ("forecast", "estimate")
    }
    params = {
        "forecast": candidates[start][0].params["forecast"],
        "local_experts_device": start_record.pop("local_experts_device", "cpu"),
        "start": start,
        "start_record": start_record,  # the start plan's own reasons, before the moves
        "candidates": {name: list(k) for name, (_, k) in candidates.items()},
        "remoe_key": None if remoe_key is None else list(remoe_key),
        "key": list(key),
        "moves": search.moves,
        "hedging": {"confidence": confidence, "hoeffding_hedged": hoeffding * (2.0 - confidence)},
        "estimator_calls": judge.calls,
        "reuse": judge.reuse,
    }
    result = Plan(
        "moemesh", chosen.main, chosen.local, chosen.functions, chosen.micro_batch_tokens, params
    )
    result.validate(shape.moe_layers, shape.experts_per_layer)
    return annotate(result, forecast, profiles, cluster, workload, warm=warm)
