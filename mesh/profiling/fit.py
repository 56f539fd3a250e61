"""From a profile run's samples to the allocator's Profiles (pure: numpy and allocator.profiles).

    expert_points(samples, ...)  per (memory, tokens) point: round-trip and compute stats, the
                                 transport overhead of the call size, the fitted quantity expert_s
    fit_profiles(...)            expert time vs (memory, tokens): both families; transport
                                 overhead vs call bytes and cold start vs weight bytes: linear;
                                 the spawn path's CPU weight from a burst of cold starts
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning

from allocator.coldstart import SPAWN_PATH_SHARES, fit_spawn_shares, simulate_node
from allocator.profiles import (
    SYNTHETIC_SPAWN_S,
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
    """fit_profiles' result: the Profiles to store, both expert fits, the [n, 3] points
    (memory_gb, tokens, expert_s) they were fitted to (memory uncapped, for the plot), and the
    burst fit's report (fit_burst; None without a burst)."""

    profiles: Profiles
    fit: LatencyFit
    points: np.ndarray
    burst: dict | None = None


def _linear(x: list[float], y: list[float]) -> tuple[LinearModel, FitReport]:
    """y = intercept + x / bandwidth; with one distinct x, the mean of y and no slope."""
    if len(set(x)) > 1:
        return fit_linear(x, y)
    mean = float(np.mean(y))
    return LinearModel(mean, 0.0), FitReport("linear", {"intercept": mean, "slope": 0.0}, 0.0, 0.0, math.inf, len(y))


BURST_TOLERANCE = 0.25  # the modelled INIT sum must be this close to the measured one to be kept


def _served_bytes(cold: dict, shape: ModelShape) -> int:
    """The weight bytes a measured cold start loaded as the mesh serves them (its experts x
    shape.bytes_per_expert; a record without its expert count: the bytes it read)."""
    return int(cold["experts"]) * shape.bytes_per_expert if "experts" in cold else int(cold["bytes"])


def _full_vcpu_s(cold: dict) -> float:
    """A measured cold start's seconds as it would take on a full vCPU: its fork and the cgroup
    join ("spawn", "limits": not bound by its quota) as measured, the rest (weights, ready: CPU
    work at the quota) times its CPU share (``cpu_share``, at most 1; none recorded: 1)."""
    stages = cold.get("stages") or {}
    share = min(1.0, float(cold.get("cpu_share", 1.0)))
    if share >= 1.0 or not stages:
        return float(cold["seconds"])
    fixed = float(stages.get("spawn", 0.0)) + float(stages.get("limits", 0.0))
    return fixed + max(float(cold["seconds"]) - fixed, 0.0) * share


def fit_burst(profiles: Profiles, burst: dict) -> tuple[Profiles, dict]:
    """(profiles with spawn_shares fitted to the burst, the fit's report): the weight with which
    allocator.coldstart bills the burst's measured INIT, per node as the burst ran (burst["node"]
    and burst["cpus"] per instance), given the INIT alone each instance has in ``profiles``
    (cold start less fork, the part its quota bounds, at the burst's CPU share, after
    ``init_fixed_s``); the report puts the modelled sum, mean and last ready beside the
    measured ones. Where no weight brings the modelled sum within BURST_TOLERANCE of the measured
    one (the INITs of the burst took longer than any sharing of the CPUs makes them: the
    processor-sharing model does not explain this host's burst), the built-in weight is kept and
    the report says so ("explained": false), rather than a weight at the grid's edge."""
    spawn = profiles.spawn_s
    members: dict[int, list[int]] = {}
    for index, node in enumerate(burst.get("node") or [0] * len(burst["bytes"])):
        members.setdefault(int(node), []).append(index)
    cpus = burst["cpus"] if isinstance(burst["cpus"], list) else [burst["cpus"]] * len(burst["bytes"])
    gates = [n.get("init_cpus") for n in burst.get("nodes") or ()]
    cap = min(1.0, float(burst.get("cpu_share", 1.0)))  # INIT at the instance's quota, one thread
    alone = [float(profiles.init_s(profiles.shape.bytes_per_expert))] * len(burst["bytes"])  # one expert each
    groups = [(float(cpus[m[0]]), [alone[i] for i in m], [cap] * len(m),
               float(gates[k]) if k < len(gates) and gates[k] else math.inf)
              for k, m in members.items()]
    fixed = profiles.init_fixed_s
    fitted = fit_spawn_shares(groups, spawn, burst["init_sum_s"], fixed_s=fixed)

    def simulate(weight: float) -> tuple[list[float], list[float]]:
        ready, init = [], []
        for node_cpus, node_alone, caps, gate in groups:
            r, i = simulate_node(node_cpus, [spawn] * len(node_alone), node_alone, caps, weight, gate,
                                 [fixed] * len(node_alone))
            ready += list(r)
            init += list(i)
        return ready, init

    ready, init = simulate(fitted)
    explained = bool(abs(sum(init) - burst["init_sum_s"]) <= BURST_TOLERANCE * burst["init_sum_s"])
    shares = fitted if explained else SPAWN_PATH_SHARES
    if not explained:  # CPU sharing alone does not make this burst's INIT: keep the built-in weight
        ready, init = simulate(shares)
    report = {"spawn_shares": shares, "fitted_spawn_shares": fitted, "explained": explained,
              "functions": len(alone), "nodes": len(groups),
              "cpus": [g[0] for g in groups], "init_alone_s": float(np.mean(alone)),
              "init_sum_s": {"measured": burst["init_sum_s"], "modelled": float(np.sum(init))},
              "init_mean_s": {"measured": float(np.mean(burst["init_s"])), "modelled": float(np.mean(init))},
              "last_ready_s": {"measured": burst["last_ready_s"], "modelled": float(np.max(ready))}}
    return dataclasses.replace(profiles, spawn_shares=shares), report


def fit_profiles(rows: list[dict], overhead: dict[int, float], cold: list[dict], shape: ModelShape, host: str,
                 model_name: str, activation_bytes: int, saturation_gb: float, family: str = "best",
                 burst: dict | None = None) -> Fitted:
    """Profiles.synthetic(shape) with the measured expert curve (the family with the smaller
    residual standard error, or `family`), scatter-gather (transport overhead vs the call's
    bytes, activations sent + received, activation_bytes a row in the [model] dtype) and cold
    start (seconds vs weight bytes read), the billed curve (the workers' mean compute_s, best
    family: what invocation billing bills), and with a burst (measure.cold_burst) the spawn
    path's weight (fit_burst; its report in Fitted.burst)."""
    tokens = sorted(overhead)
    points = np.array([[r["memory_gb"], r["tokens"], r["expert_s"]] for r in rows])
    fit_points = points.copy()
    fit_points[:, 0] = np.minimum(fit_points[:, 0], saturation_gb)  # the fit's objective ignores the cap
    with warnings.catch_warnings():  # curve_fit's "covariance could not be estimated": errors are reported
        warnings.simplefilter("ignore", OptimizeWarning)
        fit = fit_expert_latency(fit_points, saturation_gb=saturation_gb,
                                 token_slope=None if len(tokens) > 1 else 0.0)
    chosen = fit.best if family == "best" else fit.candidates[family]
    # What invocation billing bills: the worker's own execution time (mean compute_s per point).
    billed_points = np.array([[r["memory_gb"], r["tokens"], max(r["compute_s"]["mean"], 1e-7)] for r in rows])
    billed_points[:, 0] = np.minimum(billed_points[:, 0], saturation_gb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        billed = fit_expert_latency(billed_points, saturation_gb=saturation_gb,
                                    token_slope=None if len(tokens) > 1 else 0.0).best
    scatter_gather, sg_report = _linear([2 * t * activation_bytes for t in tokens], [overhead[t] for t in tokens])
    # Keyed on the weights as served (experts x shape.bytes_per_expert, what the estimator asks
    # for), not the bytes read: a bf16 checkpoint served in float32 reads half its served bytes.
    cold_start, cold_report = _linear([_served_bytes(c, shape) for c in cold], [_full_vcpu_s(c) for c in cold])
    spawns = [c["stages"]["spawn"] for c in cold if "spawn" in (c.get("stages") or {})]
    limits = [c["stages"]["limits"] for c in cold if "limits" in (c.get("stages") or {})]
    profiles = dataclasses.replace(
        Profiles.synthetic(shape, host=host), model=model_name, expert=chosen,
        scatter_gather=scatter_gather, cold_start=cold_start,
        spawn_s=float(np.median(spawns)) if spawns else SYNTHETIC_SPAWN_S,  # as Profiles.from_dict reads it
        init_fixed_s=float(np.median(limits)) if limits else 0.0,
        expert_billed=billed,
        reports=(*fit.reports, dataclasses.replace(sg_report, family="scatter_gather"),
                 dataclasses.replace(cold_report, family="cold_start")),
    )
    burst_report = None
    if burst:
        profiles, burst_report = fit_burst(profiles, burst)
    return Fitted(profiles, fit, points, burst_report)
