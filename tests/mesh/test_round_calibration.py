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


def test_the_mesh_own_steps_replace_the_start_up_dense_timing():
    """The dense intercept becomes the median of the steps' time outside the MoE rounds, less
    the profile's per-token slope (a prefill of 40 rows beside one-row decode steps)."""
    profiles = Profiles.synthetic(small_shape())
    slope = profiles.dense.slope
    steps = [(40, 0.002 + slope * 40)] + [(1, 0.0015 + slope)] * 20 + [(1, 0.009 + slope)] * 3  # a few slow ones
    calibrated = planning.calibrated_profiles(profiles, {}, steps)
    assert calibrated.dense.intercept == pytest.approx(0.0015) and calibrated.dense.slope == slope
    assert calibrated.scatter_gather == profiles.scatter_gather  # no rounds seen: as profiled
    few = steps[: planning.CALIBRATION_ROUNDS - 1]
    assert planning.calibrated_profiles(profiles, {}, few) is profiles
