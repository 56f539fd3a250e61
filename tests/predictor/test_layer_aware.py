"""Layer-aware predictor: ridge heads, gate initialisation, next-layer prediction, stragglers."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.base import ModelShape
from predictor.layer_aware import LayerAwarePredictor, LinearLoadHead
from tests.predictor.builders import make_record

SHAPE = ModelShape(layers=2, experts=4, top_k=1)


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_ridge_head_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    true_weights, true_bias = rng.normal(size=(5, 4)), rng.normal(size=4)
    head = LinearLoadHead(5, 4, ridge=1e-9)
    for _ in range(200):
        x = rng.normal(size=5)
        head.update(x, softmax(x @ true_weights + true_bias))
    # Softmax ignores a shift shared by all experts, so the map is recovered centred per row.
    np.testing.assert_allclose(head.weights[:5], true_weights - true_weights.mean(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(head.weights[5], true_bias - true_bias.mean(), atol=1e-6)
    probe = rng.normal(size=5)
    np.testing.assert_allclose(head.predict(probe), softmax(probe @ true_weights + true_bias), atol=1e-6)
    assert head.leverage(probe) < head.leverage(100 * probe)  # far-away inputs are less certain


def test_untrained_head_is_the_gate():
    rng = np.random.default_rng(1)
    gate = rng.normal(size=(2, 4, 6))  # [layers, experts, d]
    predictor = LayerAwarePredictor(SHAPE, gate_weights=gate)
    hidden = rng.normal(size=6)
    for layer in range(2):
        np.testing.assert_allclose(predictor.prompt_heads[layer].predict(hidden), softmax(gate[layer] @ hidden))


def test_wide_inputs_are_projected_and_the_gate_prior_follows():
    rng = np.random.default_rng(2)
    gate = rng.normal(size=(2, 4, 100))
    predictor = LayerAwarePredictor(SHAPE, gate_weights=gate, max_features=16)
    assert predictor.projection.shape == (16, 100)
    np.testing.assert_allclose(predictor.projection @ predictor.projection.T, np.eye(16), atol=1e-10)
    hidden = predictor.projection.T @ rng.normal(size=16)  # a hidden state inside the projected span
    np.testing.assert_allclose(predictor.prompt_heads[0].predict(predictor.projection @ hidden), softmax(gate[0] @ hidden))
    record = make_record("r", [1, 2], hidden, [[2, 0, 0, 0], [0, 1, 1, 0]])
    predictor.observe_record(record)
    assert predictor.forecast(record.features()).distribution.shape == (2, 4)


def test_next_layer_prediction_reads_the_previous_layers_gate_input():
    """Layer 1's load is set by the hidden state entering layer 0; the embedding is noise."""
    rng = np.random.default_rng(3)
    predictor = LayerAwarePredictor(SHAPE, seed=0, ridge=1e-3)
    for index in range(200):
        hot = int(rng.integers(4))
        gate_inputs = np.stack([np.eye(4)[hot] + 0.05 * rng.normal(size=4), rng.normal(size=4)])
        prefill = np.zeros((2, 4), int)
        prefill[0] = rng.multinomial(20, [0.25] * 4)
        prefill[1, hot] = 20
        predictor.observe_record(make_record(f"r{index}", range(20), rng.normal(size=4), prefill, gate_inputs=gate_inputs))
    for hot in range(4):
        load = predictor.predict_next_layer(1, np.eye(4)[hot], tokens=10)
        assert load.sum() == pytest.approx(10 * SHAPE.top_k)
        assert np.argmax(load) == hot and load[hot] > 0.6 * load.sum()
    with pytest.raises(ValueError):
        predictor.predict_next_layer(2, np.zeros(4))


def test_learns_embedding_to_load_and_flags_stragglers():
    rng = np.random.default_rng(4)
    predictor = LayerAwarePredictor(SHAPE, seed=0)
    def record(index, cluster):
        prefill = np.full((2, 4), 1)
        prefill[:, cluster] = 30  # cluster's expert is a straggler in both layers
        return make_record(f"r{index}", range(20), np.eye(4)[cluster] + 0.05 * rng.normal(size=4), prefill)
    for index in range(120):
        predictor.observe_record(record(index, index % 4))
    forecast = predictor.forecast(record(999, 2).features())
    assert np.argmax(forecast.distribution[0]) == 2 and forecast.distribution[0, 2] > 0.6
    assert (0, 2) in forecast.stragglers and (1, 2) in forecast.stragglers
    assert all(expert == 2 for _, expert in forecast.stragglers)
    assert 0.0 < forecast.confidence <= 1.0
    far_away = make_record("far", range(20), 50 * np.ones(4), np.ones((2, 4), int))
    assert predictor.forecast(far_away.features()).confidence < forecast.confidence
