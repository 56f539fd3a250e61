"""From a profile run's samples to the allocator's Profiles (pure: numpy and allocator.profiles).

    expert_points(samples, ...)  per (memory, tokens) point: round-trip and compute stats, the
                                 transport overhead of the call size, the fitted quantity expert_s
    fit_profiles(...)            expert time vs (memory, tokens): both families; transport
                                 overhead vs call bytes and cold start vs weight bytes: linear
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning

from allocator.profiles import (
    FitReport,
    LatencyFit,
    LinearModel,
    ModelShape,
    Profiles,
    fit_expert_latency,
    fit_linear,
)
from mesh.profiling.measure import stats


def expert_points(samples: dict, memory_sizes, token_counts, activation_bytes: int,
                  saturation_gb: float) -> tuple[list[dict], dict[int, float]]:
    """(rows, overhead): per point stats and expert_s; the transport overhead per call size.

    samples: (memory_gb, tokens) -> {"round_trip_s", "compute_s", "round_means_s"} (measure.sweep).
    The overhead of a call size is the median of round trip - compute_s over the sizes at or
    above saturation (never throttled; the largest size if none is). A point's expert_s is the
    median over rounds of the round's mean round trip minus that overhead, at least the
    worker's median compute_s."""
    unthrottled = [m for m in memory_sizes if m >= saturation_gb] or [max(memory_sizes)]
    overhead = {}
    for t in token_counts:
        gaps = [np.subtract(samples[(m, t)]["round_trip_s"], samples[(m, t)]["compute_s"]) for m in unthrottled]
        overhead[t] = float(np.median(np.concatenate(gaps)))
    rows = []
    for (memory, t), s in sorted(samples.items()):
        rt, compute = stats(s["round_trip_s"]), stats(s["compute_s"])
        rt["median_of_round_means"] = float(np.median(s["round_means_s"]))
        rt["round_means"] = s["round_means_s"]
        expert = max(rt["median_of_round_means"] - overhead[t], compute["median"], 1e-7)
        rows.append({"memory_gb": memory, "tokens": t, "bytes": 2 * t * activation_bytes,
                     "round_trip_s": rt, "compute_s": compute, "overhead_s": overhead[t], "expert_s": expert})
    return rows, overhead


@dataclass
class Fitted:
    """fit_profiles' result: the Profiles to store, both expert fits, and the [n, 3] points
    (memory_gb, tokens, expert_s) they were fitted to (memory uncapped, for the plot)."""

    profiles: Profiles
    fit: LatencyFit
    points: np.ndarray


def _linear(x: list[float], y: list[float]) -> tuple[LinearModel, FitReport]:
    """y = intercept + x / bandwidth; with one distinct x, the mean of y and no slope."""
    if len(set(x)) > 1:
        return fit_linear(x, y)
    mean = float(np.mean(y))
    return LinearModel(mean, 0.0), FitReport("linear", {"intercept": mean, "slope": 0.0}, 0.0, 0.0, math.inf, len(y))


def fit_profiles(rows: list[dict], overhead: dict[int, float], cold: list[dict], shape: ModelShape, host: str,
                 model_name: str, activation_bytes: int, saturation_gb: float, family: str = "best") -> Fitted:
    """Profiles.synthetic(shape) with the measured expert curve (the family with the smaller
    residual standard error, or `family`), scatter-gather (transport overhead vs the call's
    bytes, activations sent + received, activation_bytes a row in the [model] dtype) and cold
    start (seconds vs weight bytes read)."""
    tokens = sorted(overhead)
    points = np.array([[r["memory_gb"], r["tokens"], r["expert_s"]] for r in rows])
    fit_points = points.copy()
    fit_points[:, 0] = np.minimum(fit_points[:, 0], saturation_gb)  # the fit's objective ignores the cap
    with warnings.catch_warnings():  # curve_fit's "covariance could not be estimated": errors are reported
        warnings.simplefilter("ignore", OptimizeWarning)
        fit = fit_expert_latency(fit_points, saturation_gb=saturation_gb,
                                 token_slope=None if len(tokens) > 1 else 0.0)
    chosen = fit.best if family == "best" else fit.candidates[family]
    scatter_gather, sg_report = _linear([2 * t * activation_bytes for t in tokens], [overhead[t] for t in tokens])
    cold_start, cold_report = _linear([c["bytes"] for c in cold], [c["seconds"] for c in cold])
    profiles = dataclasses.replace(
        Profiles.synthetic(shape, host=host), model=model_name, expert=chosen,
        scatter_gather=scatter_gather, cold_start=cold_start,
        reports=(*fit.reports, dataclasses.replace(sg_report, family="scatter_gather"),
                 dataclasses.replace(cold_report, family="cold_start")),
    )
    return Fitted(profiles, fit, points)
