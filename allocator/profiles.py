"""Latency-vs-memory models of expert functions, their fits, and the per-(host, model) record.

Sources: Remoe (PAPERS.md 1.4 A7) fits remote expert time against function memory as
``T(y) = a * exp(-b * y) + c``; on this machine the mean expert time follows about 1 / CPU
share (3.8 / 8.0 / 17-20 ms at 100 / 50 / 25 % of a vCPU), which the hyperbola
``T(y) = a + b / y`` describes with one parameter fewer. Both are fitted with
``scipy.optimize.curve_fit`` and the one with the smaller residual standard error
``sqrt(SSE / (n - p))`` wins (ties go to fewer parameters); RMSE and mean relative error of
each are reported.

Token scaling (2-D model, fitted jointly): one call of an expert on ``n`` tokens takes
``curve(memory_gb) * (1 + token_slope * (n - 1))``: ``curve`` is the one-token call time and
both its fixed and per-token parts scale with the CPU share. Memory above ``saturation_gb``
buys no speed (a worker uses at most its threads; PAPERS.md 5 ``work / min(vcpu, threads)``).

Cold start (ServerlessLLM, PAPERS.md 4): ``intercept + bytes / bandwidth``, a linear fit of
seconds against weight bytes, of which ``spawn_s`` is the zygote's fork (the median "spawn"
stage of the measured cold starts): serial per node, and not billed as INIT
(allocator.coldstart). Scatter-gather per call: ``intercept + bytes / bandwidth`` with
bytes = activations sent plus received.

Points are ``[n, 3]`` arrays of (memory_gb, tokens, seconds). ``Profiles.synthetic()`` holds
the numbers above (the expert curve is fitted from them) until ``moemesh profile`` measures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import curve_fit, nnls

from allocator.coldstart import SPAWN_PATH_SHARES
from allocator.model import ModelShape

FAMILIES = ("exponential", "hyperbolic")
# Measured here (mean expert call, one token): (memory_gb at 1 GB per vCPU, tokens, seconds).
MEASURED_EXPERT_POINTS = np.array(
    [[1.0, 1, 0.0038], [0.5, 1, 0.0080], [0.25, 1, 0.017], [0.25, 1, 0.020]]
)


@dataclass(frozen=True)
class ExponentialCurve:
    """Remoe's ``T(y) = a * exp(-b * y) + c`` seconds at memory y GB (y capped at saturation_gb)."""

    a: float
    b: float
    c: float
    saturation_gb: float = math.inf
    family: str = field(default="exponential", init=False)

    def __call__(self, memory_gb):
        y = np.minimum(memory_gb, self.saturation_gb)
        return self.a * np.exp(-self.b * y) + self.c

    def derivative(self, memory_gb):
        y = np.asarray(memory_gb, dtype=float)
        slope = -self.a * self.b * np.exp(-self.b * np.minimum(y, self.saturation_gb))
        return np.where(y < self.saturation_gb, slope, 0.0)

    def second_derivative(self, memory_gb):
        y = np.asarray(memory_gb, dtype=float)
        curvature = self.a * self.b**2 * np.exp(-self.b * np.minimum(y, self.saturation_gb))
        return np.where(y < self.saturation_gb, curvature, 0.0)

    def parameters(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c}


@dataclass(frozen=True)
class HyperbolicCurve:
    """``T(y) = a + b / y`` seconds at memory y GB: time ~ 1 / CPU share (y capped at saturation_gb)."""

    a: float
    b: float
    saturation_gb: float = math.inf
    family: str = field(default="hyperbolic", init=False)

    def __call__(self, memory_gb):
        return self.a + self.b / np.minimum(memory_gb, self.saturation_gb)

    def derivative(self, memory_gb):
        y = np.asarray(memory_gb, dtype=float)
        return np.where(
            y < self.saturation_gb, -self.b / np.minimum(y, self.saturation_gb) ** 2, 0.0
        )

    def second_derivative(self, memory_gb):
        y = np.asarray(memory_gb, dtype=float)
        return np.where(
            y < self.saturation_gb, 2.0 * self.b / np.minimum(y, self.saturation_gb) ** 3, 0.0
        )

    def parameters(self) -> dict:
        return {"a": self.a, "b": self.b}


Curve = ExponentialCurve | HyperbolicCurve


@dataclass(frozen=True)
class ExpertLatency:
    """Seconds of one expert call: ``curve(memory_gb) * (1 + token_slope * (tokens - 1))``."""

    curve: Curve
    token_slope: float = 0.0

    def __post_init__(self) -> None:
        if self.token_slope < 0:
            raise ValueError(f"ExpertLatency: token_slope must be >= 0, got {self.token_slope}")

    def seconds(self, memory_gb, tokens):
        """One call on ``tokens`` >= 1 tokens."""
        return self.curve(memory_gb) * (
            1.0 + self.token_slope * (np.asarray(tokens, dtype=float) - 1.0)
        )

    def expected_seconds(self, memory_gb, tokens):
        """Expected call time for a fractional expected token count (0 tokens: no call).

        Below one token the count is the chance of a call: ``curve * min(n, 1) + curve *
        token_slope * max(n - 1, 0)``, equal to :meth:`seconds` for n >= 1.
        """
        n = np.asarray(tokens, dtype=float)
        return self.curve(memory_gb) * (
            np.minimum(n, 1.0) + self.token_slope * np.maximum(n - 1.0, 0.0)
        )


@dataclass(frozen=True)
class LinearModel:
    """``seconds = intercept + slope * x``; x is bytes (cold start, transfer) or tokens (compute)."""

    intercept: float
    slope: float

    def __post_init__(self) -> None:
        if self.intercept < 0 or self.slope < 0:
            raise ValueError(
                f"LinearModel: intercept and slope must be >= 0, got {self.intercept}, {self.slope}"
            )

    def __call__(self, x):
        return self.intercept + self.slope * np.asarray(x, dtype=float)

    def expected(self, count):
        """Expected time for a fractional expected count (below 1: the chance of a call)."""
        n = np.asarray(count, dtype=float)
        return self.intercept * np.minimum(n, 1.0) + self.slope * n

    @property
    def bandwidth(self) -> float:
        """1 / slope: bytes (or tokens) per second."""
        return math.inf if self.slope == 0 else 1.0 / self.slope


@dataclass(frozen=True)
class FitReport:
    """How well one family fits: RMSE (s), mean relative error, residual standard error (s)."""

    family: str
    parameters: dict
    rmse_s: float
    relative_error: float
    residual_standard_error_s: float
    points: int


@dataclass(frozen=True)
class LatencyFit:
    """The chosen expert model and every family's fit (for reports and :func:`plot_fits`)."""

    best: ExpertLatency
    candidates: dict[str, ExpertLatency]
    reports: tuple[FitReport, ...]

    def report(self, family: str) -> FitReport:
        return next(r for r in self.reports if r.family == family)


def _check_points(points) -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(
            f"points must be [n, 3] (memory_gb, tokens, seconds), got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("points must be finite")
    if np.any(array[:, 0] <= 0) or np.any(array[:, 1] < 1) or np.any(array[:, 2] <= 0):
        raise ValueError("points need memory_gb > 0, tokens >= 1, seconds > 0")
    return array


def _report(
    family: str, parameters: dict, predicted: np.ndarray, measured: np.ndarray, free: int
) -> FitReport:
    residual = predicted - measured
    sse = float(np.sum(residual**2))
    dof = measured.size - free
    rse = math.sqrt(sse / dof) if dof > 0 else math.inf
    return FitReport(
        family=family,
        parameters=parameters,
        rmse_s=math.sqrt(sse / measured.size),
        relative_error=float(np.mean(np.abs(residual) / measured)),
        residual_standard_error_s=rse,
        points=int(measured.size),
    )


def _initial_token_slope(memory: np.ndarray, tokens: np.ndarray, seconds: np.ndarray) -> float:
    """Mean over memory levels of slope / (intercept + slope) from ``seconds = u + v * tokens``."""
    slopes = []
    for level in np.unique(memory):
        at = memory == level
        if np.unique(tokens[at]).size >= 2:
            v, u = np.polyfit(tokens[at], seconds[at], 1)
            if u + v > 0:
                slopes.append(max(v / (u + v), 0.0))
    return float(np.mean(slopes)) if slopes else 0.0


def _fit_family(
    family: str, points: np.ndarray, saturation_gb: float, fixed_token_slope: float | None
):
    memory, tokens, seconds = points.T
    fit_slope = fixed_token_slope is None
    slope0 = _initial_token_slope(memory, tokens, seconds) if fit_slope else fixed_token_slope
    normalised = seconds / (1.0 + slope0 * (tokens - 1.0))

    if family == "hyperbolic":
        (a0, b0), _ = nnls(np.column_stack([np.ones_like(memory), 1.0 / memory]), normalised)
        start = [a0, max(b0, 1e-12)]

        def curve(y, a, b):
            return a + b / y

    elif family == "exponential":
        best = None
        for rate in np.geomspace(1e-2, 1e2, 41) / np.mean(memory):
            (a0, c0), residual = nnls(
                np.column_stack([np.exp(-rate * memory), np.ones_like(memory)]), normalised
            )
            if best is None or residual < best[0]:
                best = (residual, [max(a0, 1e-12), rate, c0])
        start = best[1]

        def curve(y, a, b, c):
            return a * np.exp(-b * y) + c

    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    curve_parameters = len(start)

    def model(x, *p):
        y, n = x
        slope = p[curve_parameters] if fit_slope else fixed_token_slope
        return curve(y, *p[:curve_parameters]) * (1.0 + slope * (n - 1.0))

    p0 = start + ([slope0] if fit_slope else [])
    lower = [0.0] * len(p0)
    if family == "exponential":
        lower[1] = 1e-9
    p0 = [max(v, lo + 1e-12) for v, lo in zip(p0, lower)]
    try:
        fitted, _ = curve_fit(
            model,
            np.vstack([memory, tokens]),
            seconds,
            p0=p0,
            bounds=(lower, [np.inf] * len(p0)),
            maxfev=20000,
        )
    except RuntimeError:  # no convergence: keep the linearised start, reported as such by its error
        fitted = np.asarray(p0)
    token_slope = float(fitted[curve_parameters]) if fit_slope else float(fixed_token_slope)
    if family == "hyperbolic":
        chosen = HyperbolicCurve(float(fitted[0]), float(fitted[1]), saturation_gb)
    else:
        chosen = ExponentialCurve(
            float(fitted[0]), float(fitted[1]), float(fitted[2]), saturation_gb
        )
    latency = ExpertLatency(chosen, token_slope)
    parameters = chosen.parameters() | {"token_slope": token_slope}
    predicted = latency.seconds(np.minimum(memory, saturation_gb), tokens)
    report = _report(family, parameters, predicted, seconds, len(p0))
    return latency, report


def fit_expert_latency(
    points,
    *,
    families: tuple[str, ...] = FAMILIES,
    saturation_gb: float = math.inf,
    token_slope: float | None = None,
) -> LatencyFit:
    """Fit each family to ``points`` [n, 3] (memory_gb, tokens, seconds) and pick the best.

    token_slope: fix the per-token factor instead of fitting it (it must be fixed when every
    point has the same token count; it then defaults to 0). The winner has the smallest
    residual standard error; a tie (within 1e-9 relative) goes to fewer parameters.
    """
    array = _check_points(points)
    if not families:
        raise ValueError("fit_expert_latency: no families")
    if np.unique(array[:, 0]).size < 2:
        raise ValueError("fit_expert_latency: need points at two or more memory sizes")
    if token_slope is None and np.unique(array[:, 1]).size < 2:
        token_slope = 0.0
    candidates, reports = {}, []
    for family in families:
        latency, report = _fit_family(family, array, saturation_gb, token_slope)
        candidates[family] = latency
        reports.append(report)

    best_error = min(r.residual_standard_error_s for r in reports)
    tied = [r for r in reports if r.residual_standard_error_s <= best_error * (1 + 1e-6) + 1e-12]
    winner = min(tied, key=lambda r: (len(r.parameters), r.residual_standard_error_s))
    return LatencyFit(candidates[winner.family], candidates, tuple(reports))


def fit_linear(x, seconds) -> tuple[LinearModel, FitReport]:
    """Least-squares ``seconds = intercept + slope * x`` (both clipped at 0): cold start vs bytes,
    scatter-gather vs bytes, compute vs tokens."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(seconds, dtype=float)
    if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
        raise ValueError(
            f"fit_linear: need two equal 1-D arrays of >= 2 points, got {xs.shape}, {ys.shape}"
        )
    if np.unique(xs).size < 2:
        raise ValueError("fit_linear: need two or more distinct x values")
    (intercept, slope), _ = nnls(np.column_stack([np.ones_like(xs), xs]), ys)
    model = LinearModel(float(intercept), float(slope))
    return model, _report(
        "linear", {"intercept": model.intercept, "slope": model.slope}, model(xs), ys, 2
    )


def _curve_from_dict(data: Mapping) -> Curve:
    saturation = math.inf if data.get("saturation_gb") is None else float(data["saturation_gb"])
    if data["family"] == "exponential":
        return ExponentialCurve(float(data["a"]), float(data["b"]), float(data["c"]), saturation)
    if data["family"] == "hyperbolic":
        return HyperbolicCurve(float(data["a"]), float(data["b"]), saturation)
    raise ValueError(f"unknown curve family {data['family']!r}")


def _latency_from_dict(data: Mapping | None) -> ExpertLatency | None:
    if data is None:
        return None
    return ExpertLatency(_curve_from_dict(data["curve"]), float(data["token_slope"]))


def _curve_to_dict(curve: Curve) -> dict:
    saturation = None if math.isinf(curve.saturation_gb) else curve.saturation_gb
    return {"family": curve.family, **curve.parameters(), "saturation_gb": saturation}


SYNTHETIC_SPAWN_S = 0.015  # the zygote's fork, measured here alone (moemesh profile: 13-19 ms)


def _spawn_s(data: Mapping) -> float:
    """The median "spawn" stage of the cold starts `moemesh profile` recorded under
    ``measurement`` (it fits the total only), else ``spawn_s`` as stored, else 0."""
    cold = (data.get("measurement") or {}).get("cold_starts") or []
    spawns = [c["stages"]["spawn"] for c in cold if "spawn" in (c.get("stages") or {})]
    if spawns:
        return float(np.median(spawns))
    return float(data.get("spawn_s") or 0.0)


def _init_fixed_s(data: Mapping) -> float:
    """``init_fixed_s`` as stored, else the median "limits" stage of the cold starts recorded
    under ``measurement``, else 0 (all of INIT bound by the quota, as before it was split)."""
    if data.get("init_fixed_s") is not None:
        return float(data["init_fixed_s"])
    cold = (data.get("measurement") or {}).get("cold_starts") or []
    limits = [c["stages"]["limits"] for c in cold if "limits" in (c.get("stages") or {})]
    return float(np.median(limits)) if limits else 0.0


@dataclass(frozen=True)
class Profiles:
    """Measured (or synthetic) behaviour of one model on one host.

    shape:           the model (see allocator.model)
    expert:          CPU expert function call time vs (memory_gb, tokens)
    gpu_expert:      expert call on a GPU: seconds vs tokens
    dense:           the main function's non-expert work per MoE layer (attention, norms,
                     gate, GPU<->CPU copies) on its device: seconds vs tokens
    cold_start:      expert function cold start: seconds vs weight bytes
    main_cold_start: main function cold start: seconds vs weight bytes
    scatter_gather:  per call round trip: seconds vs bytes sent + received
    runtime_gb:      memory of a worker besides its weights and buffers
    reports:         the fits' quality, for the record
    spawn_s:         the fork part of ``cold_start`` (one at a time per node; not INIT)
    init_fixed_s:    the part of INIT its CPU quota does not bound: joining its cgroup (the
                     worker's "limits" stage: 6-21 ms at 0.125 GB as at 1 GB, where loading its
                     weights takes 7x as long at an eighth of the quota); the rest of INIT is
                     CPU work at the quota (``init_s``)
    spawn_shares:    the spawn path's CPU weight while forks queue on a node (allocator.coldstart),
                     fitted by `moemesh profile` to a burst of cold starts on this host
    expert_billed:   the worker's own execution time of a CPU call vs (memory_gb, tokens): what
                     invocation billing bills (``expert`` is the caller's wait, which also holds
                     the CFS stalls of a small share before the call starts); None: ``expert``
    cfs_period_s:    the CFS period the functions were measured under: ``expert`` is measured
                     back to back, where a small share waits out its quota on every call; a call
                     that finds its quota unspent runs at full speed until the quota is spent
                     (allocator.cost ``spaced_call_s``); None: every call as back to back
    """

    host: str
    model: str
    shape: ModelShape
    expert: ExpertLatency
    gpu_expert: LinearModel
    dense: LinearModel
    cold_start: LinearModel
    main_cold_start: LinearModel
    scatter_gather: LinearModel
    runtime_gb: float = 0.1
    reports: tuple[FitReport, ...] = ()
    spawn_s: float = 0.0
    init_fixed_s: float = 0.0
    spawn_shares: float = SPAWN_PATH_SHARES
    expert_billed: ExpertLatency | None = None
    cfs_period_s: float | None = None

    @property
    def billed_expert(self) -> ExpertLatency:
        """The curve a CPU call is billed by (``expert_billed``, else ``expert``)."""
        return self.expert_billed if self.expert_billed is not None else self.expert

    def __post_init__(self) -> None:
        if self.runtime_gb < 0:
            raise ValueError(f"Profiles: runtime_gb must be >= 0, got {self.runtime_gb}")
        if self.spawn_s < 0:
            raise ValueError(f"Profiles: spawn_s must be >= 0, got {self.spawn_s}")
        if self.init_fixed_s < 0:
            raise ValueError(f"Profiles: init_fixed_s must be >= 0, got {self.init_fixed_s}")
        if self.spawn_shares <= 0:
            raise ValueError(f"Profiles: spawn_shares must be > 0, got {self.spawn_shares}")
        if self.cfs_period_s is not None and self.cfs_period_s <= 0:
            raise ValueError(f"Profiles: cfs_period_s must be > 0, got {self.cfs_period_s}")

    def init_s(self, weight_bytes):
        """CPU-seconds of a cold start's INIT (weights, ready): the cold start alone on a full
        vCPU less its fork and the part its quota does not bound (``init_fixed_s``)."""
        return np.maximum(self.cold_start(weight_bytes) - self.spawn_s - self.init_fixed_s, 0.0)

    def weights_s(self, weight_bytes):
        """Seconds a running process takes to read these expert weights on one thread (the
        cold-start line's slope: its weights stage, without fork, cgroup join or ready): what the
        main function spends loading the experts a re-plan keeps local."""
        return np.maximum(np.asarray(weight_bytes, dtype=float) * float(self.cold_start.slope), 0.0)

    def to_dict(self) -> dict:
        linear = ("gpu_expert", "dense", "cold_start", "main_cold_start", "scatter_gather")
        return {
            "host": self.host,
            "model": self.model,
            "shape": asdict(self.shape),
            "expert": {
                "curve": _curve_to_dict(self.expert.curve),
                "token_slope": self.expert.token_slope,
            },
            **{name: asdict(getattr(self, name)) for name in linear},
            "runtime_gb": self.runtime_gb,
            "spawn_s": self.spawn_s,
            "init_fixed_s": self.init_fixed_s,
            "spawn_shares": self.spawn_shares,
            "cfs_period_s": self.cfs_period_s,
            "expert_billed": None if self.expert_billed is None else {
                "curve": _curve_to_dict(self.expert_billed.curve),
                "token_slope": self.expert_billed.token_slope,
            },
            "reports": [asdict(r) for r in self.reports],
        }

    @staticmethod
    def from_dict(data: Mapping) -> Profiles:
        linear = ("gpu_expert", "dense", "cold_start", "main_cold_start", "scatter_gather")
        reports = []
        for r in data.get("reports", []):
            fields = dict(r)
            if fields.get("residual_standard_error_s") is None:
                fields["residual_standard_error_s"] = math.inf
            reports.append(FitReport(**fields))
        return Profiles(
            host=data["host"],
            model=data["model"],
            shape=ModelShape(**data["shape"]),
            expert=_latency_from_dict(data["expert"]),
            **{name: LinearModel(**data[name]) for name in linear},
            runtime_gb=float(data["runtime_gb"]),
            reports=tuple(reports),
            spawn_s=_spawn_s(data),
            init_fixed_s=_init_fixed_s(data),
            spawn_shares=float(data.get("spawn_shares") or SPAWN_PATH_SHARES),
            expert_billed=_latency_from_dict(data.get("expert_billed")),
            cfs_period_s=_cfs_period_s(data),
        )

    def to_json(self) -> str:
        """Strict JSON (infinities written as null); store it per host and model."""
        data = self.to_dict()
        for r in data["reports"]:
            if math.isinf(r["residual_standard_error_s"]):
                r["residual_standard_error_s"] = None
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False)

    @staticmethod
    def from_json(text: str) -> Profiles:
        return Profiles.from_dict(json.loads(text))

    @property
    def full_speed_gb(self) -> float:
        """The memory at which the expert curve stops improving: one call's time at full speed
        (a function below it computes as fast until its CPU quota is spent)."""
        saturation = getattr(self.expert.curve, "saturation_gb", math.inf)
        return float(saturation) if math.isfinite(saturation) else 1.0

    @staticmethod
    def synthetic(shape: ModelShape | None = None, host: str = "synthetic") -> Profiles:
        """The numbers measured on this machine, for tests and before ``moemesh profile``.

        Expert curve: fitted from MEASURED_EXPERT_POINTS (the hyperbola wins), saturating at
        2 GB (2 cores). Assumed until measured: token_slope 0.05 (20 tokens ~ 2x one token),
        GPU expert 0.3 ms + 2 us/token, dense 1 ms + 20 us/token per layer, cold start
        0.25 s + bytes at 1.5 GB/s (zygote fork, 15 ms of it, + safetensors mmap), main cold start 1 s +
        bytes at 2 GB/s, scatter-gather 0.3 ms per call (DESIGN.md: 0.6 ms to 8 workers) +
        bytes at 3 GB/s (ZeroMQ, DESIGN.md), 0.1 GB worker runtime.
        """
        fit = fit_expert_latency(MEASURED_EXPERT_POINTS, saturation_gb=2.0, token_slope=0.05)
        return Profiles(
            host=host,
            model=(shape or ModelShape.synthetic()).name or "model",
            shape=shape or ModelShape.synthetic(),
            expert=fit.best,
            gpu_expert=LinearModel(0.3e-3, 2e-6),
            dense=LinearModel(1.0e-3, 2.0e-5),
            cold_start=LinearModel(0.25, 1 / 1.5e9),
            main_cold_start=LinearModel(1.0, 1 / 2e9),
            scatter_gather=LinearModel(0.3e-3, 1 / 3e9),
            runtime_gb=0.1,
            reports=fit.reports,
            spawn_s=SYNTHETIC_SPAWN_S,
        )


def plot_fits(points, fits: Mapping[str, ExpertLatency], path) -> None:
    """Write a PNG: measured call time vs memory (one marker per token count) and each fit's curve.

    points: [n, 3] (memory_gb, tokens, seconds); fits: label -> ExpertLatency (e.g. LatencyFit.candidates).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    array = _check_points(points)
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    memory = np.linspace(array[:, 0].min() * 0.8, array[:, 0].max() * 1.2, 200)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    token_counts = np.unique(array[:, 1])[:4]
    for colour, tokens in zip(colours, token_counts):
        at = array[:, 1] == tokens
        axes.scatter(
            array[at, 0], array[at, 2] * 1e3, color=colour, label=f"measured, {tokens:g} tokens"
        )
        for style, (label, latency) in zip(["-", "--", ":", "-."], fits.items()):
            axes.plot(
                memory,
                latency.seconds(memory, tokens) * 1e3,
                style,
                color=colour,
                label=f"{label}, {tokens:g} tokens",
            )
    axes.set_xlabel("function memory (GB)")
    axes.set_ylabel("expert call time (ms)")
    axes.set_title("expert latency vs memory")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _cfs_period_s(data: Mapping) -> float | None:
    """cfs_period_s as stored, else the period the profile's measurement ran under (None: unknown)."""
    if data.get("cfs_period_s"):
        return float(data["cfs_period_s"])
    period_us = ((data.get("measurement") or {}).get("functions") or {}).get("cfs_period_us")
    return float(period_us) / 1e6 if period_us else None
