"""Shared helpers: shapes, normalisation, the load formula, stragglers."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.base import (
    ModelShape,
    build_forecast,
    expected_sampling_total_variation,
    normalise_rows,
    stragglers_from_load,
)
from predictor.forecast import PromptFeatures


def features(n_prompt: int, new_tokens: int) -> PromptFeatures:
    return PromptFeatures(
        token_ids=np.arange(n_prompt), token_embeddings=np.ones((n_prompt, 2)), embedding=np.ones(2),
        expected_new_tokens=new_tokens,
    )


def test_model_shape_checks():
    with pytest.raises(ValueError):
        ModelShape(2, 4, 5)
    with pytest.raises(ValueError):
        ModelShape(0, 4, 1)
    assert ModelShape(2, 4, 2).matrix_shape == (2, 4)


def test_normalise_rows_clips_and_fills_empty_rows():
    result = normalise_rows(np.array([[2.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(result, [[0.5, 0, 0.5, 0], [0.25, 0.25, 0.25, 0.25]])


def test_build_forecast_load_is_distribution_times_tokens_times_top_k():
    shape = ModelShape(2, 4, 2)
    distribution = np.array([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]])
    forecast = build_forecast(distribution, features(10, 5), shape, 0.7, "test")
    np.testing.assert_allclose(forecast.distribution.sum(axis=1), 1.0)
    np.testing.assert_allclose(forecast.load, forecast.distribution * 15 * 2)
    assert forecast.confidence == 0.7 and forecast.source == "test"
    # layer 0: mean 7.5, expert 2 has 15 > 1.5 x 7.5 -> straggler; layer 1: expert 3 has 30
    assert forecast.stragglers == ((0, 2), (1, 3))


def test_stragglers_threshold_and_empty_layers():
    load = np.array([[1.0, 1.0, 1.0, 1.6], [0.0, 0.0, 0.0, 0.0]])
    assert stragglers_from_load(load, 1.2) == ((0, 3),)
    assert stragglers_from_load(load, 1.5) == ()


def test_sampling_noise_shrinks_with_request_size():
    distribution = np.full((1, 4), 0.25)
    small, large = (expected_sampling_total_variation(distribution, n)[0] for n in (10, 1000))
    assert large < small / 5
