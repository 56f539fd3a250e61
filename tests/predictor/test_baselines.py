"""Moving average, recent use and the oracle on hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.baselines import MovingAverage, RecentUse
from predictor.forecast import Activation
from predictor.oracle import OraclePredictor
from tests.predictor.builders import make_record

CONSTANT = [[3, 1, 0, 0], [0, 0, 2, 2]]


def record(index: int, prefill, n_tokens: int = 4):
    return make_record(f"r{index}", list(range(index, index + n_tokens)), [1.0, 0.0], prefill)


def test_moving_average_on_constant_traces_equals_the_constant(small_shape):
    predictor = MovingAverage(small_shape, smoothing=0.2)
    assert predictor.forecast(record(0, CONSTANT).features()).confidence == 0.0
    for index in range(30):
        predictor.observe_record(record(index, CONSTANT))
        expected = np.array(CONSTANT) / np.array(CONSTANT).sum(axis=1, keepdims=True)
        forecast = predictor.forecast(record(99, CONSTANT).features())
        np.testing.assert_allclose(forecast.distribution, expected, atol=1e-12)
    np.testing.assert_allclose(forecast.load, expected * 4 * 1)
    assert forecast.confidence > 0.5  # perfectly stable history


def test_moving_average_follows_a_shift_and_loses_confidence_when_unstable(small_shape):
    steady, flipping = MovingAverage(small_shape), MovingAverage(small_shape)
    other = [[0, 0, 1, 3], [2, 2, 0, 0]]
    for index in range(40):
        steady.observe_record(record(index, CONSTANT))
        flipping.observe_record(record(index, CONSTANT if index % 2 else other))
    probe = record(99, CONSTANT).features()
    assert flipping.forecast(probe).confidence < steady.forecast(probe).confidence
    for index in range(40, 80):
        steady.observe_record(record(index, other))
    assert np.argmax(steady.forecast(probe).distribution[0]) == 3


def test_recent_use_returns_exactly_the_experts_of_the_last_requests(small_shape):
    predictor = RecentUse(small_shape, window=2, weighting="uniform")
    predictor.observe_record(record(0, [[0, 0, 0, 5], [5, 0, 0, 0]]))  # falls out of the window
    predictor.observe_record(record(1, [[1, 0, 0, 0], [0, 1, 0, 0]]))
    predictor.observe_record(record(2, [[0, 2, 0, 0], [0, 2, 0, 0]]))
    forecast = predictor.forecast(record(3, CONSTANT).features())
    np.testing.assert_allclose(forecast.distribution, [[0.5, 0.5, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(predictor.used_experts(), [[1, 1, 0, 0], [0, 1, 0, 0]])


def test_recent_use_recency_weighting(small_shape):
    predictor = RecentUse(small_shape, window=3, weighting="recency", decay=0.5)
    predictor.observe_record(record(0, [[1, 0, 0, 0], [1, 0, 0, 0]]))
    predictor.observe_record(record(1, [[0, 1, 0, 0], [1, 0, 0, 0]]))
    forecast = predictor.forecast(record(2, CONSTANT).features())
    np.testing.assert_allclose(forecast.distribution[0], [1 / 3, 2 / 3, 0, 0])
    np.testing.assert_allclose(forecast.distribution[1], [1, 0, 0, 0])


def test_oracle_returns_the_truth(small_shape):
    records = [record(0, CONSTANT), record(1, [[0, 4, 0, 0], [1, 1, 1, 1]])]
    oracle = OraclePredictor.from_records(small_shape, records)
    forecast = oracle.forecast(records[1].features())
    np.testing.assert_array_equal(forecast.load, records[1].activation().total)
    np.testing.assert_allclose(forecast.distribution[1], 0.25)
    assert forecast.confidence == 1.0 and forecast.stragglers == ((0, 1),)
    with pytest.raises(KeyError):
        oracle.forecast(record(7, CONSTANT).features())
    by_text = OraclePredictor(small_shape, {"prompt r7": Activation(np.ones((2, 4), int), np.zeros((2, 4), int))})
    assert by_text.forecast(record(7, CONSTANT).features()).load.sum() == 8


def test_activation_shape_is_checked(small_shape):
    with pytest.raises(ValueError, match="shape"):
        MovingAverage(small_shape).observe_record(record(0, [[1, 0, 0], [0, 1, 0]]))
