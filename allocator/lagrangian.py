"""Remote function memory per layer from the Lagrangian dual (Remoe A7, PAPERS.md 1.4).

Problem (continuous relaxation, one remote memory size y_l per layer)::

    minimise   sum_l f_l(y_l),   f_l(y) = (1 + eta) * (w_l * T(y) + o_l) * (H + c * y)
    subject to sum_l w_l * T(y_l) <= budget,   lower_l <= y_l <= upper_l

w_l: expected remote expert calls per decode token in layer l (Remoe's s~_l times top_k);
T(y): one call's time at memory y (the fitted curve); o_l: per-token remote overhead
(invocation + transfer); H: the main function's $ per second; c: $ per GB-s of remote memory;
eta: Remoe's prefill/decode ratio bound (prefill adds at most eta of the decode cost);
budget: the TPOT SLO minus everything memory does not change.

f_l is convex for y >= 2/b - H/c with Remoe's exponential (Thm 2) and everywhere with the
hyperbola, so strong duality holds (Slater) and the solution is: the smallest lambda >= 0
whose per-layer minimisers of ``f_l(y) + lambda * w_l * T(y)`` meet the budget. Lambda is
found by bisection (the constraint is non-increasing in lambda); each per-layer 1-D problem
is solved for all layers at once (vectorised) by a safeguarded Newton iteration on the
derivative (Newton steps inside the bracket where the derivative changes sign, bisection
otherwise: the minimiser of a convex function on [lower, upper]), then compared with both
ends as a safeguard where convexity fails. Rounding to the memory grid is the caller's: rounding up
only lowers T, so the constraint stays met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from allocator.profiles import Curve


@dataclass(frozen=True)
class MemorySolution:
    """memory_gb: [layers] continuous optimum; multiplier: lambda; inner_solves: per-layer 1-D solves."""

    memory_gb: np.ndarray
    multiplier: float
    objective: float
    constraint_s: float
    budget_s: float
    feasible: bool
    outer_iterations: int
    inner_solves: int


def layer_objective(
    memory_gb, weights, overheads, curve: Curve, main_rate: float, memory_price: float, eta: float
):
    """f_l(y) for every layer: ``(1 + eta) * (w_l * T(y_l) + o_l) * (H + c * y_l)``; shapes [layers]."""
    return (
        (1.0 + eta)
        * (weights * curve(memory_gb) + overheads)
        * (main_rate + memory_price * memory_gb)
    )


def _minimise_layers(
    multiplier,
    weights,
    overheads,
    curve,
    main_rate,
    memory_price,
    eta,
    lower,
    upper,
    bracket,
    tolerance_gb,
):
    """Argmin over [lower, upper] of f_l(y) + multiplier * w_l * T(y), all layers at once.

    bracket: (low, high) [layers] known to contain the minimiser (the minimiser grows with the
    multiplier, so solutions at smaller / larger multipliers bracket it), narrowing the search.
    """

    def slope(y):
        time, dtime = curve(y), curve.derivative(y)
        return (1.0 + eta) * (
            weights * dtime * (main_rate + memory_price * y)
            + (weights * time + overheads) * memory_price
        ) + multiplier * weights * dtime

    def value(y):
        return layer_objective(
            y, weights, overheads, curve, main_rate, memory_price, eta
        ) + multiplier * weights * curve(y)

    def curvature(y):
        return (1.0 + eta) * weights * (
            curve.second_derivative(y) * (main_rate + memory_price * y)
            + 2.0 * curve.derivative(y) * memory_price
        ) + multiplier * weights * curve.second_derivative(y)

    # Concave-then-convex (Remoe's exponential below 2/b - H/c): on the concave part the
    # minimum is at an end, so search the convex part [convex_from, upper] and compare ends.
    concave = curvature(lower) < 0
    convex_from = lower.copy()
    if concave.any():
        low, high = lower.copy(), upper.copy()
        for _ in range(
            max(
                1,
                math.ceil(
                    math.log2(max(float(np.max(upper - lower)), tolerance_gb) / tolerance_gb)
                ),
            )
        ):
            middle = 0.5 * (low + high)
            bending = curvature(middle) < 0
            low = np.where(bending, middle, low)
            high = np.where(bending, high, middle)
        convex_from = np.where(concave, high, lower)
    # Safeguarded Newton on the derivative: Newton steps inside the bracket, else bisection.
    # Layers whose derivative keeps one sign over the bracket sit at an end and are done.
    low = np.where(concave, convex_from, np.maximum(bracket[0], lower))
    high = np.where(concave, upper, np.maximum(bracket[1], low))
    at_low, at_high = slope(low) >= 0, slope(high) <= 0
    point = np.where(at_low, low, np.where(at_high, high, 0.5 * (low + high)))
    active = ~(at_low | at_high)
    for _ in range(64):
        if not active.any():
            break
        gradient, second = slope(point), curvature(point)
        rising = gradient > 0
        high = np.where(active & rising, point, high)
        low = np.where(active & ~rising, point, low)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = point - gradient / second
        inside = (second > 0) & (newton > low) & (newton < high)
        step = np.where(active, np.where(inside, newton, 0.5 * (low + high)), point)
        active &= (np.abs(step - point) > 0.1 * tolerance_gb) & (high - low > tolerance_gb)
        point = step
    candidates = np.stack([np.clip(point, lower, upper), lower, upper])
    values = np.stack([value(c) for c in candidates])
    return candidates[np.argmin(values, axis=0), np.arange(lower.size)]


def solve_memory_lagrangian(
    weights,
    overheads,
    curve: Curve,
    lower_gb,
    upper_gb,
    budget_s: float,
    main_rate: float,
    memory_price: float,
    *,
    eta: float = 0.1,
    relative_tolerance: float = 1e-4,
    multiplier_tolerance: float = 1e-3,
    tolerance_gb: float = 1e-4,
    max_outer: int = 100,
) -> MemorySolution:
    """Solve the problem of the module docstring.

    weights, overheads, lower_gb, upper_gb: [layers]; weights >= 0, 0 < lower <= upper.
    The multiplier is found by false position (Illinois) on ``constraint(lambda) - budget``,
    stopping once the constraint is met within ``relative_tolerance`` of the budget, or the
    multiplier is bracketed within ``multiplier_tolerance`` (relative; where the constraint
    jumps, in the non-convex case, it cannot be met with equality); memory is resolved to
    ``tolerance_gb`` (the grid step is 0.1 GB). Returns the continuous optimum;
    when even ``upper`` misses the budget, ``upper`` with ``feasible=False``.
    ``inner_solves`` counts per-layer 1-D minimisations (the work measure).
    """
    w = np.asarray(weights, dtype=float)
    o = np.broadcast_to(np.asarray(overheads, dtype=float), w.shape).copy()
    lower = np.broadcast_to(np.asarray(lower_gb, dtype=float), w.shape).copy()
    upper = np.broadcast_to(np.asarray(upper_gb, dtype=float), w.shape).copy()
    if w.ndim != 1 or w.size == 0:
        raise ValueError(
            f"solve_memory_lagrangian: weights must be a non-empty 1-D array, got {w.shape}"
        )
    if np.any(w < 0) or np.any(o < 0):
        raise ValueError("solve_memory_lagrangian: weights and overheads must be >= 0")
    if np.any(lower <= 0) or np.any(upper < lower):
        raise ValueError("solve_memory_lagrangian: need 0 < lower_gb <= upper_gb")
    if main_rate < 0 or memory_price <= 0 or eta < 0:
        raise ValueError("solve_memory_lagrangian: need main_rate >= 0, memory_price > 0, eta >= 0")

    solves = 0

    def solve(multiplier: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        nonlocal solves
        solves += w.size
        return _minimise_layers(
            multiplier,
            w,
            o,
            curve,
            main_rate,
            memory_price,
            eta,
            lower,
            upper,
            (low, high),
            tolerance_gb,
        )

    def excess(y: np.ndarray) -> float:
        return float(np.sum(w * curve(y))) - budget_s

    def result(y: np.ndarray, multiplier: float, feasible: bool, outer: int) -> MemorySolution:
        objective = float(np.sum(layer_objective(y, w, o, curve, main_rate, memory_price, eta)))
        return MemorySolution(
            y, multiplier, objective, excess(y) + budget_s, budget_s, feasible, outer, solves
        )

    y_low = solve(0.0, lower, upper)
    if excess(y_low) <= 0:
        return result(y_low, 0.0, True, 1)
    if excess(upper) > 0:
        return result(upper.copy(), math.inf, False, 1)
    # Bracket geometrically from a lambda of the order of the objective's rate (x4 / 4 steps).
    outer = 1
    low, high = 0.0, (1.0 + eta) * (main_rate + memory_price * float(upper.max()))
    y_high = solve(high, y_low, upper)
    while excess(y_high) > 0 and outer < max_outer:
        low, y_low = high, y_high
        high *= 4.0
        y_high = solve(high, y_low, upper)
        outer += 1
    while low == 0.0 and outer < max_outer:
        candidate = high / 4.0
        y_candidate = solve(candidate, y_low, y_high)
        outer += 1
        if excess(y_candidate) > 0:
            low, y_low = candidate, y_candidate
        else:
            high, y_high = candidate, y_candidate
    # Illinois false position on g(lambda) = excess, g(low) > 0 >= g(high). Two steps that do
    # not halve the bracket (the constraint jumps where a layer leaves its lower end in the
    # non-convex case, or is flat) are followed by a bisection step.
    g_low, g_high = excess(y_low), excess(y_high)
    side, widths, bisect = 0, [high - low, high - low], False
    while (
        -g_high > relative_tolerance * budget_s
        and high - low > multiplier_tolerance * high
        and outer < max_outer
    ):
        if bisect:
            middle = 0.5 * (low + high)
        else:
            middle = high - g_high * (high - low) / (g_high - g_low)
        if not low < middle < high:
            middle = 0.5 * (low + high)
        y_middle = solve(middle, y_low, y_high)
        g_middle = excess(y_middle)
        outer += 1
        if g_middle <= 0:
            high, y_high, g_high = middle, y_middle, g_middle
            g_low = g_low / 2 if side == +1 else g_low
            side = +1
        else:
            low, y_low, g_low = middle, y_middle, g_middle
            g_high = g_high / 2 if side == -1 else g_high
            side = -1
        bisect = high - low > 0.5 * widths[-2]
        widths.append(high - low)
    return result(y_high, high, excess(y_high) <= 1e-12 * max(budget_s, 1.0), outer)
