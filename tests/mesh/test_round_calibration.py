"""The planner takes the data plane's per-call time from the mesh's own rounds (mesh.planning)."""

from __future__ import annotations

import pytest

from allocator.profiles import Profiles
from mesh import planning
from tests.allocator.conftest import small_shape


def test_rounds_replace_the_profiled_per_call_time():
    profiles = Profiles.synthetic(small_shape())
    slope = profiles.scatter_gather.slope
    rounds = {  # one call of 1 KiB a round at 3.3 ms, 0.3 ms of it the worker's compute; a 3 ms layer too
        "0": {"rounds": 30, "mean_round_s": 0.0033, "calls_per_round": 1.0, "bytes_per_round": 1024,
              "slowest_compute_s": 0.0003},
        "1": {"rounds": 10, "mean_round_s": 0.0043, "calls_per_round": 2.0, "bytes_per_round": 2048,
              "slowest_compute_s": 0.0003},
    }
    calibrated = planning.calibrated_profiles(profiles, rounds)
    expected = (30 * (0.003 - slope * 2048) + 10 * (0.004 - slope * 2048)) / 40
    assert calibrated.scatter_gather.intercept == pytest.approx(expected)
    assert calibrated.scatter_gather.slope == slope
    assert calibrated.expert == profiles.expert and calibrated.cold_start == profiles.cold_start


def test_too_few_rounds_keep_the_profile():
    profiles = Profiles.synthetic(small_shape())
    few = {"0": {"rounds": planning.CALIBRATION_ROUNDS - 1, "mean_round_s": 0.01, "calls_per_round": 1.0,
                 "bytes_per_round": 0, "slowest_compute_s": 0.0}}
    assert planning.calibrated_profiles(profiles, few) is profiles
    assert planning.calibrated_profiles(profiles, {}) is profiles
