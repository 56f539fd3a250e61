"""Remoe A7's Lagrangian solver against scipy on small instances, and its work on 32 layers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.optimize import NonlinearConstraint, minimize, minimize_scalar

from allocator.lagrangian import layer_objective, solve_memory_lagrangian
from allocator.profiles import ExponentialCurve, HyperbolicCurve

C_CPU = 0.0000166667
CURVES = [
    HyperbolicCurve(0.0005, 0.0045),
    HyperbolicCurve(0.0, 0.0045, saturation_gb=2.0),
    ExponentialCurve(0.05, 2.4363, 0.002),  # Remoe's DeepSeek-V2-Lite rate
    ExponentialCurve(0.05, 11.8665, 0.001),  # Remoe's GPT2-moe rate
]


def random_instance(rng, layers, curve):
    weights = rng.uniform(0.1, 2.0, layers)
    overheads = rng.uniform(0.0, 1e-3, layers)
    lower = rng.uniform(0.125, 0.5, layers)
    upper = np.full(layers, 3.0)
    main_rate = rng.choice([0.0, rng.uniform(0, 2e-6), rng.uniform(1e-5, 1e-4)])
    fastest, slowest = np.sum(weights * curve(upper)), np.sum(weights * curve(lower))
    budget = fastest + rng.uniform(0.05, 0.9) * (slowest - fastest)
    return weights, overheads, lower, upper, budget, main_rate


def scipy_best(weights, overheads, lower, upper, budget, main_rate, curve):
    """Best feasible objective of SLSQP from two starts (trust-constr if both fail), scaled for them."""
    scale = float(np.sum(layer_objective(upper, weights, overheads, curve, main_rate, C_CPU, 0.1)))

    def objective(y):
        return (
            float(np.sum(layer_objective(y, weights, overheads, curve, main_rate, C_CPU, 0.1)))
            / scale
        )

    best = np.inf
    for start in (upper.copy(), 0.5 * (lower + upper)):
        run = minimize(
            objective,
            start,
            method="SLSQP",
            bounds=list(zip(lower, upper)),
            constraints=[
                {"type": "ineq", "fun": lambda y: 1.0 - np.sum(weights * curve(y)) / budget}
            ],
            options={"maxiter": 1000, "ftol": 1e-12},
        )
        if np.sum(weights * curve(run.x)) <= budget * (1 + 1e-6):
            best = min(best, objective(run.x) * scale)
    if not np.isfinite(best):  # SLSQP failed from both starts: the slower interior-point method
        run = minimize(
            objective,
            upper.copy(),
            method="trust-constr",
            bounds=list(zip(lower, upper)),
            constraints=[
                NonlinearConstraint(lambda y: np.sum(weights * curve(y)) / budget, -np.inf, 1.0)
            ],
            options={"maxiter": 2000},
        )
        if np.sum(weights * curve(run.x)) <= budget * (1 + 1e-6):
            best = objective(run.x) * scale
    return best


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lagrangian_matches_scipy_on_small_instances(rng):
    binding, worst = 0, 0.0
    for curve in CURVES:
        for _ in range(6):
            weights, overheads, lower, upper, budget, main_rate = random_instance(rng, 4, curve)
            ours = solve_memory_lagrangian(
                weights, overheads, curve, lower, upper, budget, main_rate, C_CPU
            )
            assert ours.feasible
            assert ours.constraint_s <= budget * (1 + 1e-9)
            assert np.all(ours.memory_gb >= lower - 1e-12) and np.all(
                ours.memory_gb <= upper + 1e-12
            )
            reference = scipy_best(weights, overheads, lower, upper, budget, main_rate, curve)
            gap = (ours.objective - reference) / reference
            worst = max(worst, gap)
            assert gap <= 0.01, (curve, gap)
            binding += ours.multiplier > 0
    print(
        f"\nLagrangian vs scipy: worst relative gap {worst:+.2e} over {4 * 6} instances, {binding} with the TPOT constraint binding"
    )
    assert binding >= 5


def test_unconstrained_layers_match_minimize_scalar(rng):
    """With a loose budget (lambda = 0) each layer is its own bounded 1-D problem."""
    curve = ExponentialCurve(0.05, 2.4363, 0.002)
    weights, overheads, lower, upper, _, main_rate = random_instance(rng, 6, curve)
    ours = solve_memory_lagrangian(weights, overheads, curve, lower, upper, 1e9, 3e-5, C_CPU)
    assert ours.multiplier == 0.0
    for layer in range(6):

        def one(y, layer=layer):
            return float(
                layer_objective(
                    np.array([y]),
                    weights[layer : layer + 1],
                    overheads[layer : layer + 1],
                    curve,
                    3e-5,
                    C_CPU,
                    0.1,
                )[0]
            )

        reference = minimize_scalar(
            one, bounds=(lower[layer], upper[layer]), method="bounded", options={"xatol": 1e-8}
        )
        assert one(ours.memory_gb[layer]) <= reference.fun * (1 + 1e-6)


def test_infeasible_budget_returns_the_largest_sizes():
    curve = HyperbolicCurve(0.001, 0.004)
    result = solve_memory_lagrangian(
        [1.0, 1.0], [0.0, 0.0], curve, [0.2, 0.2], [1.0, 1.0], 0.001, 1e-5, C_CPU
    )
    assert not result.feasible
    np.testing.assert_allclose(result.memory_gb, [1.0, 1.0])


def test_preconditions():
    curve = HyperbolicCurve(0.001, 0.004)
    with pytest.raises(ValueError, match="lower_gb <= upper_gb"):
        solve_memory_lagrangian([1.0], [0.0], curve, [2.0], [1.0], 1.0, 1e-5, C_CPU)
    with pytest.raises(ValueError, match="weights"):
        solve_memory_lagrangian([-1.0], [0.0], curve, [0.5], [1.0], 1.0, 1e-5, C_CPU)


def test_thirty_two_layers_cost_few_inner_solves(rng):
    """32 layers (a 32 x 64 model has one remote size per layer): the work is counted in
    per-layer 1-D solves; wall time is printed, and asserted only very loosely."""
    layers = 32
    weights, overheads = rng.uniform(0.1, 2.0, layers), rng.uniform(0.0, 1e-3, layers)
    lower, upper = rng.uniform(0.2, 0.6, layers), np.full(layers, 10.0)
    for curve in (
        HyperbolicCurve(0.0005, 0.0045, saturation_gb=2.0),
        ExponentialCurve(0.05, 2.4363, 0.002),
    ):
        fastest, slowest = np.sum(weights * curve(upper)), np.sum(weights * curve(lower))
        budget = fastest + 0.05 * (slowest - fastest)
        started = time.perf_counter()
        result = solve_memory_lagrangian(
            weights, overheads, curve, lower, upper, budget, 0.0, C_CPU
        )
        elapsed = time.perf_counter() - started
        print(
            f"\n32 layers, {curve.family}: {elapsed * 1e3:.2f} ms, {result.outer_iterations} multiplier steps, "
            f"{result.inner_solves} per-layer solves, lambda {result.multiplier:.3g}"
        )
        assert result.feasible and result.multiplier > 0  # the TPOT constraint binds
        assert result.inner_solves <= 40 * layers
        assert elapsed < 1.0
