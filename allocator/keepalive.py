"""Keep-alive policies: how long an idle function instance stays loaded, and when to pre-warm it.

Source: Shahrad et al., "Serverless in the Wild: Characterizing and Optimizing the Serverless
Workload at a Large Cloud Provider" (USENIX ATC'20), the hybrid histogram policy. Per
function, a histogram of idle times (IT: end of one call to the start of the next) in
fixed-width bins over a bounded range (the paper: 1-minute bins over 4 hours, 240 bins; here
``bin_s`` and ``range_s``, default 1 s x 240 for runs of minutes). From it:

- **pre-warm window** = the 5th percentile of ITs (lower edge of its bin), less a 10 % margin:
  after a call the instance is unloaded and loaded again that long after the call ended;
- **keep-alive window** = the 99th percentile (upper edge of its bin), plus a 10 % margin:
  counted from the end of the call, the instance stays loaded until then;
- **not representative** -> fall back to a fixed keep-alive: too few ITs (``min_samples``), a
  flat histogram (coefficient of variation of the bin counts below ``cv_threshold``: the paper
  keeps the histogram only when its counts are concentrated), or too many ITs beyond the range
  (``max_out_of_range`` share; the paper switches to ARIMA there, which we do not implement:
  the fallback is the fixed keep-alive).

A decision is ``KeepAlive(prewarm_s, keep_alive_s)``: loaded during ``[prewarm_s,
keep_alive_s]`` after a call ends (``prewarm_s = 0``: stays loaded from the end of the call).
A call arriving in that window is warm, any other is a cold start. Pure functions: the
coordinator is not wired to them yet (it keeps ``functions.keep_alive_s``).

Entry points: :func:`decide` (a policy name and a function's idle times -> KeepAlive) and
:func:`simulate` (replay call times under a policy: cold starts and loaded seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEEP_ALIVE_POLICIES = ("fixed", "none", "histogram")


@dataclass(frozen=True)
class KeepAlive:
    """Loaded from ``prewarm_s`` to ``keep_alive_s`` seconds after a call ends (0 <= pre <= keep)."""

    prewarm_s: float
    keep_alive_s: float
    policy: str
    reason: str = ""

    def __post_init__(self) -> None:
        if not (0.0 <= self.prewarm_s <= self.keep_alive_s) or not math.isfinite(self.keep_alive_s):
            raise ValueError(f"KeepAlive: need 0 <= prewarm_s <= keep_alive_s < inf, got "
                             f"{self.prewarm_s}, {self.keep_alive_s}")

    def warm_after(self, idle_s: float) -> bool:
        """Whether a call arriving ``idle_s`` after the previous call ended finds the instance loaded."""
        return self.prewarm_s <= idle_s <= self.keep_alive_s


@dataclass(frozen=True)
class HistogramSettings:
    """The hybrid histogram policy's parameters (module docstring; paper defaults in brackets).

    bin_s: bin width [60 s]; range_s: histogram range [4 h]; head/tail_percentile: [5, 99];
    margin: [10 %]; cv_threshold: bin-count CV below which the histogram is not representative;
    min_samples: fewest ITs to trust it; max_out_of_range: largest share of ITs beyond range_s;
    fallback_s: fixed keep-alive when not representative.
    """

    bin_s: float = 1.0
    range_s: float = 240.0
    head_percentile: float = 5.0
    tail_percentile: float = 99.0
    margin: float = 0.1
    cv_threshold: float = 2.0
    min_samples: int = 10
    max_out_of_range: float = 0.5
    fallback_s: float = 30.0

    def __post_init__(self) -> None:
        if not (self.bin_s > 0 and self.range_s >= self.bin_s):
            raise ValueError("HistogramSettings: need bin_s > 0 and range_s >= bin_s")
        if not 0 <= self.head_percentile < self.tail_percentile <= 100:
            raise ValueError("HistogramSettings: need 0 <= head_percentile < tail_percentile <= 100")
        if not 0 <= self.margin < 1 or self.min_samples < 1 or self.fallback_s < 0:
            raise ValueError("HistogramSettings: need 0 <= margin < 1, min_samples >= 1, fallback_s >= 0")


def idle_times(call_starts: Sequence[float], call_ends: Sequence[float] | None = None) -> np.ndarray:
    """[calls - 1] idle seconds between consecutive calls: start of one minus end of the previous
    (ends default to the starts: instantaneous calls); negative gaps (overlap) count as 0."""
    starts = np.asarray(call_starts, dtype=float)
    ends = starts if call_ends is None else np.asarray(call_ends, dtype=float)
    if starts.ndim != 1 or ends.shape != starts.shape:
        raise ValueError("idle_times: call_starts and call_ends must be equal 1-D arrays")
    if np.any(np.diff(starts) < 0):
        raise ValueError("idle_times: call_starts must be sorted")
    return np.maximum(starts[1:] - ends[:-1], 0.0)


def histogram_keep_alive(idle_s: Sequence[float], settings: HistogramSettings = HistogramSettings()) -> KeepAlive:
    """The hybrid histogram decision for one function from its idle times (module docstring)."""
    its = np.asarray(idle_s, dtype=float)
    if its.ndim != 1 or np.any(~np.isfinite(its)) or np.any(its < 0):
        raise ValueError("histogram_keep_alive: idle times must be a 1-D array of finite values >= 0")
    s = settings

    def fallback(why: str) -> KeepAlive:
        return KeepAlive(0.0, s.fallback_s, "histogram", f"fixed {s.fallback_s:g} s: {why}")

    if its.size < s.min_samples:
        return fallback(f"{its.size} idle times < {s.min_samples}")
    inside = its[its < s.range_s]
    out_share = 1.0 - inside.size / its.size
    if out_share > s.max_out_of_range:
        return fallback(f"{out_share:.0%} of idle times beyond the {s.range_s:g} s range")
    bins = int(math.ceil(s.range_s / s.bin_s))
    counts = np.bincount(np.minimum((inside // s.bin_s).astype(int), bins - 1), minlength=bins)  # [bins]
    cv = float(counts.std() / counts.mean()) if counts.mean() > 0 else 0.0
    if cv < s.cv_threshold:
        return fallback(f"histogram not representative (bin-count CV {cv:.2f} < {s.cv_threshold:g})")
    cumulative = np.cumsum(counts) / inside.size  # [bins]
    head_bin = int(np.searchsorted(cumulative, s.head_percentile / 100.0 - 1e-12))
    tail_bin = int(np.searchsorted(cumulative, s.tail_percentile / 100.0 - 1e-12))
    prewarm = head_bin * s.bin_s * (1.0 - s.margin)
    keep = (tail_bin + 1) * s.bin_s * (1.0 + s.margin)
    return KeepAlive(prewarm, keep, "histogram",
                     f"{its.size} idle times, CV {cv:.2f}: pre-warm at p{s.head_percentile:g}, "
                     f"keep to p{s.tail_percentile:g} (+/-{s.margin:.0%})")


def decide(policy: str, idle_s: Sequence[float] = (), *, fixed_s: float = 30.0,
           settings: HistogramSettings | None = None) -> KeepAlive:
    """The keep-alive of one function under ``policy`` ("fixed", "none" or "histogram")."""
    if policy == "fixed":
        if fixed_s < 0:
            raise ValueError(f"decide: fixed_s must be >= 0, got {fixed_s}")
        return KeepAlive(0.0, fixed_s, "fixed", f"fixed {fixed_s:g} s")
    if policy == "none":
        return KeepAlive(0.0, 0.0, "none", "scale to zero after every call")
    if policy == "histogram":
        return histogram_keep_alive(idle_s, settings or HistogramSettings(fallback_s=fixed_s))
    raise ValueError(f"unknown keep-alive policy {policy!r}; known: {', '.join(KEEP_ALIVE_POLICIES)}")


@dataclass(frozen=True)
class KeepAliveOutcome:
    """What a policy did over a replay: cold starts and instance-seconds loaded while idle."""

    calls: int
    cold_starts: int
    idle_loaded_s: float

    @property
    def cold_share(self) -> float:
        return self.cold_starts / self.calls if self.calls else 0.0


def simulate(policy: str, call_starts: Sequence[float], call_ends: Sequence[float] | None = None, *,
             fixed_s: float = 30.0, settings: HistogramSettings | None = None,
             learn: bool = True) -> KeepAliveOutcome:
    """Replay one function's calls: the first is cold; each next one is warm when its idle time
    falls in the decision's window. ``learn``: the histogram sees only the idle times before
    each decision (online, as the paper updates it), else all of them (hindsight).

    Idle loaded time per gap: ``min(idle, keep) - prewarm`` when the instance was re-loaded
    (idle > prewarm), i.e. from the pre-warm (or the call's end) to the next call or expiry.
    """
    its = idle_times(call_starts, call_ends)
    cold, loaded = (1 if len(call_starts) else 0), 0.0
    for i, gap in enumerate(its):
        seen = its[:i] if learn else its
        decision = decide(policy, seen, fixed_s=fixed_s, settings=settings)
        if not decision.warm_after(float(gap)):
            cold += 1
        if gap > decision.prewarm_s:
            loaded += min(float(gap), decision.keep_alive_s) - decision.prewarm_s
    return KeepAliveOutcome(len(call_starts), cold, loaded)
