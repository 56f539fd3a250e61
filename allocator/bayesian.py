"""Liu, Wang, Wu's deployment search (arXiv 2501.05313; PAPERS.md 2.3 B4-B6), on our cost model.

Entry point: :func:`plan`; :class:`DeploymentSearch` runs the same search step by step so
measured costs can drive it (``propose()`` a plan, run it, ``observe(plan, measured_cost)``).

Decision per expert (Liu: one function per expert): a memory option ``M_j`` and a replica
count ``g`` in 1..G. Adapted from the paper ([D] where marked):

- **Cost model per option (B4)**, direct invocation only (our transport has no object store,
  [D]): a replica handles ``r = d / g`` prefill slots; prefill latency
  ``expert_time(M_j, r) + scatter_gather(2 D r)``; decode latency when called
  ``expert_time(M_j, 1) + scatter_gather(2 D)``; cost ``price * M_j * (g * prefill + N_out *
  p * decode) + INIT + per-request``, p = the expert's chance per decode token.
- **ODS-like greedy (B5)** [D]: every expert starts at its cheapest option; while the
  estimator says an SLO (our end-to-end limit: TTFT and TPOT) is missed, the slowest expert
  of every layer, in the phase missing its SLO by more, moves to its cheapest strictly faster
  option (Liu marks the highest-latency choice infeasible and re-chooses the cheapest); a
  round that does not lower the violation is undone and ends the loop.
- **Multi-dimensional epsilon-greedy (B6)**: one epsilon per expert, ``eps_t = eps_0 / (1 +
  rho t)``; the hottest ``mu`` share of experts decays slower (``rho_1``; Liu slows decay
  where prediction and reality disagree, which only measured runs reveal, [D]). Each
  iteration copies the best deployment (exploit) and, per expert with probability eps,
  moves one step in memory or replicas (explore, [D]). Costs come from an oracle: the
  estimator's money, times ``1 + 100 * SLO violation`` ([D]); or measured costs fed back.
  Stop when the best cost improved by less than ``zeta`` (relative) over ``patience``
  (Liu's lambda) iterations, or after ``iterations``.

The token-feature table and Bayesian posterior (B1-B2) are predictor/ work; here the forecast
is given. Deterministic under ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from allocator.cost import Loads, annotate, estimate
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.plan import FunctionSpec, MainSpec, Plan
from allocator.profiles import Profiles
from allocator.sizing import check_inputs, forecast_summary, function_required_gb, main_memory_gb
from predictor.forecast import Forecast

SLO_PENALTY = 100.0


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the search; defaults from PAPERS.md 2.4 where it gives them ([D] otherwise).

    memory_options_gb: candidate sizes (default: 8 grid sizes from the requirement to the top,
                       geometric, like Liu's 128..3072 MB options)
    """

    memory_options_gb: tuple[float, ...] = ()
    max_replicas: int = 8
    iterations: int = 60
    epsilon0: float = 0.3
    decay: float = 0.2
    slow_decay: float = 0.1
    hot_fraction: float = 0.5
    zeta: float = 0.01
    patience: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_replicas < 1 or self.iterations < 0 or self.patience < 1:
            raise ValueError(
                "SearchSettings: need max_replicas >= 1, iterations >= 0, patience >= 1"
            )
        if not 0 <= self.epsilon0 <= 1 or not 0 <= self.hot_fraction <= 1:
            raise ValueError("SearchSettings: epsilon0 and hot_fraction must lie in [0, 1]")
        if self.decay < 0 or self.slow_decay < 0 or self.zeta < 0:
            raise ValueError("SearchSettings: decay, slow_decay, zeta must be >= 0")


Oracle = Callable[[Plan], float]


class DeploymentSearch:
    """Epsilon-greedy search over (memory option, replicas) per expert; see module docstring."""

    def __init__(
        self,
        forecast: Forecast,
        profiles: Profiles,
        slo: SLO,
        cluster: Cluster,
        workload: Workload,
        settings: SearchSettings = SearchSettings(),
        *,
        warm: Sequence[WarmInstance] = (),
    ) -> None:
        check_inputs(forecast, profiles, workload)
        self.forecast, self.profiles, self.slo = forecast, profiles, slo
        self.cluster, self.workload, self.settings, self.warm = (
            cluster,
            workload,
            settings,
            tuple(warm),
        )
        shape, grid = profiles.shape, cluster.grid
        self.layers, self.experts = shape.moe_layers, shape.experts_per_layer
        need = grid.round_up(function_required_gb([(0, 0)], profiles, workload))
        if settings.memory_options_gb:
            options = sorted(
                {grid.round_up(v) for v in settings.memory_options_gb if v >= need - 1e-9}
            )
        else:
            options = sorted(
                {grid.round_up(v) for v in np.geomspace(need, grid.round_down(grid.maximum_gb), 8)}
            )
        if not options:
            raise ValueError(f"bayesian: no memory option >= the {need} GB an expert needs")
        self.options = np.array(options)
        self.main = MainSpec(main_memory_gb(0, profiles, cluster, workload), cluster.main.kind)
        self.loads = Loads.from_forecast(forecast, workload, shape.top_k)
        self._rng = np.random.default_rng(settings.seed)
        self._option_tables()
        hot = np.argsort(-self.loads.prefill.ravel() - self.loads.decode.ravel(), kind="stable")
        self._hot = np.zeros(self.layers * self.experts, dtype=bool)
        self._hot[hot[: int(round(settings.hot_fraction * hot.size))]] = True
        self._hot = self._hot.reshape(self.layers, self.experts)
        self.history: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.best: tuple[np.ndarray, np.ndarray, float] | None = None
        self.iteration = 0
        self._stall = 0
        self._start = self._ods()

    # -- the per-option cost model (B4) ------------------------------------------------------
    def _option_tables(self) -> None:
        """prefill_s/decode_s/cost: [layers, experts, options, replicas] per option (B4)."""
        shape, prices, profiles = self.profiles.shape, self.cluster.prices, self.profiles
        D, new_tokens = shape.activation_bytes, self.workload.new_tokens
        g = np.arange(1, self.settings.max_replicas + 1)[None, None, None, :]
        memory = self.options[None, None, :, None]
        slots = self.loads.prefill[:, :, None, None]
        spread = np.minimum(g, np.maximum(slots, 1.0))  # replicas a prefill call keeps busy
        per_replica = slots / spread
        full = (self.layers, self.experts, len(self.options), self.settings.max_replicas)
        self.prefill_s = np.broadcast_to(
            np.where(
                slots > 0,
                profiles.expert.expected_seconds(memory, per_replica)
                + profiles.scatter_gather(2 * D * per_replica),
                0.0,
            ),
            full,
        )
        chance = np.minimum(1.0, self.loads.decode / new_tokens)[
            :, :, None, None
        ]  # per decode token
        self.decode_s = np.broadcast_to(
            profiles.expert.seconds(memory, 1.0) + profiles.scatter_gather(2 * D), full
        )
        cold = float(profiles.cold_start(shape.bytes_per_expert))
        if prices.billing == "invocation":
            seconds = (
                spread * self.prefill_s
                + new_tokens * chance * self.decode_s
                + (g * cold if prices.bill_init else 0.0)
            )
            requests = (spread + new_tokens * chance) * prices.per_request
        else:
            seconds = g * (prices.keep_alive_s + self.slo.ttft_s + new_tokens * self.slo.tpot_s)
            requests = 0.0
        self.cost = np.broadcast_to(prices.cpu_gb_s * memory * seconds + requests, full)

    def _ods(self) -> tuple[np.ndarray, np.ndarray]:
        """ODS-like start: cheapest option each, then speed up the slowest experts until SLOs hold."""
        flat = self.cost.reshape(self.layers, self.experts, -1)
        choice = np.argmin(flat, axis=2)
        memory_index, replicas = np.divmod(choice, self.settings.max_replicas)
        replicas = replicas + 1
        rows, cols = np.indices((self.layers, self.experts))
        previous: tuple[np.ndarray, np.ndarray, float] | None = None
        for _ in range(len(self.options) * self.settings.max_replicas):
            result = self._estimate(memory_index, replicas)
            violation = result.slo_violation(self.slo)
            if previous is not None and violation >= previous[2] * (1 - 1e-6):
                memory_index, replicas = previous[0], previous[1]  # no gain (e.g. a cold main
                break  # start dominates TTFT): undo the round and stop paying for speed
            if violation == 0.0:
                break
            previous = (memory_index.copy(), replicas.copy(), violation)
            prefill_phase = result.ttft_s / self.slo.ttft_s >= result.tpot_s / self.slo.tpot_s
            table = self.prefill_s if prefill_phase else self.decode_s
            current = table[rows, cols, memory_index, replicas - 1]  # [layers, experts]
            moved = False
            for layer in range(self.layers):
                expert = int(np.argmax(current[layer]))
                faster = table[layer, expert] < current[layer, expert] * (1 - 1e-9)
                if not faster.any():
                    continue
                costs = np.where(faster, self.cost[layer, expert], np.inf)
                j, r = np.unravel_index(int(np.argmin(costs)), costs.shape)
                memory_index[layer, expert], replicas[layer, expert] = j, r + 1
                moved = True
            if not moved:
                break
        return memory_index, replicas

    # -- plans <-> decision arrays ------------------------------------------------------------
    def to_plan(self, memory_index: np.ndarray, replicas: np.ndarray) -> Plan:
        functions = tuple(
            FunctionSpec(
                f"L{layer}-E{e}",
                ((layer, e),),
                float(self.options[memory_index[layer, e]]),
                int(replicas[layer, e]),
            )
            for layer in range(self.layers)
            for e in range(self.experts)
        )
        return Plan(
            "bayesian",
            self.main,
            frozenset(),
            functions,
            params={"forecast": forecast_summary(self.forecast)},
        )

    def _decode(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        memory_index = np.zeros((self.layers, self.experts), dtype=int)
        replicas = np.ones((self.layers, self.experts), dtype=int)
        for function in plan.functions:
            if len(function.experts) != 1:
                raise ValueError(f"bayesian: function {function.id} is not one expert")
            layer, e = function.experts[0]
            matches = np.flatnonzero(np.isclose(self.options, function.memory_gb))
            if matches.size == 0:
                raise ValueError(f"bayesian: {function.memory_gb} GB is not a memory option")
            memory_index[layer, e], replicas[layer, e] = int(matches[0]), function.replicas
        return memory_index, replicas

    def _estimate(self, memory_index: np.ndarray, replicas: np.ndarray):
        plan = self.to_plan(memory_index, replicas)
        return estimate(
            plan, self.loads, self.profiles, self.cluster, self.workload, warm=self.warm
        )

    def estimated_cost(self, plan: Plan) -> float:
        """The default oracle: estimated money x (1 + 100 x SLO violation)."""
        result = estimate(
            plan, self.loads, self.profiles, self.cluster, self.workload, warm=self.warm
        )
        return result.money * (1.0 + SLO_PENALTY * result.slo_violation(self.slo))

    # -- the search loop (B6) -----------------------------------------------------------------
    def propose(self) -> Plan:
        """The next deployment to try: the ODS start first, then epsilon-greedy moves off the best."""
        if self.best is None:
            return self.to_plan(*self._start)
        memory_index, replicas, _ = self.best
        memory_index, replicas = memory_index.copy(), replicas.copy()
        s = self.settings
        t = self.iteration
        epsilon = np.where(
            self._hot, s.epsilon0 / (1 + s.slow_decay * t), s.epsilon0 / (1 + s.decay * t)
        )
        explore = self._rng.random(epsilon.shape) < epsilon
        moves = self._rng.integers(0, 4, size=epsilon.shape)
        memory_index += np.where(explore & (moves == 0), 1, 0) - np.where(
            explore & (moves == 1), 1, 0
        )
        replicas += np.where(explore & (moves == 2), 1, 0) - np.where(explore & (moves == 3), 1, 0)
        memory_index = np.clip(memory_index, 0, len(self.options) - 1)
        replicas = np.clip(replicas, 1, s.max_replicas)
        return self.to_plan(memory_index, replicas)

    def observe(self, plan: Plan, measured_cost: float) -> None:
        """Record a deployment's cost (estimated or measured); updates the best and the stall count."""
        if not np.isfinite(measured_cost):
            raise ValueError(f"bayesian: cost must be finite, got {measured_cost}")
        memory_index, replicas = self._decode(plan)
        self.history.append((memory_index, replicas, float(measured_cost)))
        self.iteration += 1
        if self.best is None:
            self.best = self.history[-1]
            return
        if measured_cost < self.best[2] * (1 - self.settings.zeta):
            self._stall = 0
        else:
            self._stall += 1
        if measured_cost < self.best[2]:
            self.best = self.history[-1]

    @property
    def converged(self) -> bool:
        return self._stall >= self.settings.patience or self.iteration > self.settings.iterations

    def best_plan(self) -> Plan:
        if self.best is None:
            raise ValueError("bayesian: nothing observed yet")
        return self.to_plan(self.best[0], self.best[1])


def plan(
    forecast: Forecast,
    profiles: Profiles,
    slo: SLO,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    settings: SearchSettings = SearchSettings(),
    oracle: Oracle | None = None,
) -> Plan:
    """Run the search to convergence with ``oracle`` (default: the estimator) and return the best."""
    search = DeploymentSearch(forecast, profiles, slo, cluster, workload, settings, warm=warm)
    judge = oracle or search.estimated_cost
    while not search.converged:
        candidate = search.propose()
        search.observe(candidate, judge(candidate))
    best = search.best_plan()
    start_cost = search.history[0][2]
    params = {
        **best.params,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "memory_options_gb": [float(v) for v in search.options],
        "iterations": search.iteration,
        "ods_cost": start_cost,
        "best_cost": search.best[2],
        "seed": settings.seed,
        "replicas_added": int(sum(f.replicas - 1 for f in best.functions)),
    }
    result = Plan("bayesian", best.main, best.local, best.functions, params=params)
    result.validate(search.layers, search.experts)
    return annotate(result, forecast, profiles, cluster, workload, warm=warm)
