"""Keep-alive policies: fixed, none, and the hybrid histogram policy of "Serverless in the Wild"."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.keepalive import (
    HistogramSettings,
    KeepAlive,
    decide,
    histogram_keep_alive,
    idle_times,
    simulate,
)


def periodic(period: float, n: int, jitter: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(period + rng.uniform(-jitter, jitter, n))


def test_fixed_and_none():
    assert decide("fixed", fixed_s=12.0) == KeepAlive(0.0, 12.0, "fixed", "fixed 12 s")
    none = decide("none")
    assert none.keep_alive_s == 0.0 and not none.warm_after(0.5)
    with pytest.raises(ValueError, match="known"):
        decide("lru")


def test_idle_times():
    assert idle_times([0, 5, 6], [1, 5.5, 7]).tolist() == [4.0, 0.5]
    assert idle_times([0, 1], [3, 4]).tolist() == [0.0]  # overlap counts as no idle time
    with pytest.raises(ValueError, match="sorted"):
        idle_times([2, 1])


def test_histogram_windows_from_a_periodic_function():
    its = idle_times(periodic(10.0, 200, 0.5))  # idle times in [9.5, 10.5]
    ka = histogram_keep_alive(its)
    assert ka.policy == "histogram" and "pre-warm" in ka.reason
    assert ka.prewarm_s == pytest.approx(9 * 0.9)  # lower edge of the p5 bin, less 10 %
    assert ka.keep_alive_s == pytest.approx(11 * 1.1)  # upper edge of the p99 bin, plus 10 %
    assert all(ka.warm_after(t) for t in its)


def test_not_representative_falls_back_to_fixed():
    s = HistogramSettings(fallback_s=30.0)
    few = histogram_keep_alive([10.0] * 5, s)
    assert (few.prewarm_s, few.keep_alive_s) == (0.0, 30.0) and "idle times <" in few.reason
    flat = histogram_keep_alive(np.random.default_rng(0).uniform(0, 240, 2000), s)
    assert flat.keep_alive_s == 30.0 and "not representative" in flat.reason
    far = histogram_keep_alive(np.full(50, 1000.0), s)
    assert far.keep_alive_s == 30.0 and "beyond" in far.reason


def test_simulation_histogram_beats_fixed_on_memory_and_none_on_cold_starts():
    starts = periodic(10.0, 300, 0.5, seed=1)
    ends = starts + 0.2
    fixed = simulate("fixed", starts, ends, fixed_s=30.0)
    none = simulate("none", starts, ends)
    hist = simulate("histogram", starts, ends, fixed_s=30.0)
    assert fixed.cold_starts == 1 and none.cold_starts == 300
    assert hist.cold_starts <= 1 + HistogramSettings().min_samples  # cold only while it learns
    assert hist.idle_loaded_s < 0.5 * fixed.idle_loaded_s  # pre-warm: unloaded most of each gap
    assert none.idle_loaded_s == 0.0
    hindsight = simulate("histogram", starts, ends, learn=False)
    assert hindsight.cold_starts == 1


@pytest.mark.parametrize("seed", range(3))
def test_decisions_are_valid_windows(seed):
    rng = np.random.default_rng(seed)
    its = rng.gamma(0.3, 20.0, 400)
    ka = histogram_keep_alive(its)
    assert 0.0 <= ka.prewarm_s <= ka.keep_alive_s
    assert ka == histogram_keep_alive(its)  # pure
