"""Bayesian popularity: conjugate counts, token-id tables with backoff, decaying exploration."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.base import ModelShape
from predictor.bayes import BayesianPopularity
from tests.predictor.builders import make_record

SHAPE = ModelShape(layers=2, experts=4, top_k=1)


def routed_record(index: int, token_ids, routing):
    """routing: per token, its expert in layer 0 and layer 1 (top_k = 1)."""
    routing = np.asarray(routing).reshape(len(token_ids), 2, 1)
    prefill = np.zeros((2, 4), dtype=int)
    for layer in range(2):
        np.add.at(prefill[layer], routing[:, layer, 0], 1)
    return make_record(f"r{index}", token_ids, [0.0, 1.0], prefill, token_routing=routing)


def test_posterior_mean_equals_counts_plus_prior():
    predictor = BayesianPopularity(SHAPE, prior_strength=0.5, use_token_ids=False, exploration_initial=0.0)
    records = [
        make_record("a", [1, 2, 3], [0, 1], [[3, 0, 0, 0], [1, 1, 1, 0]], decode=[[0, 1, 0, 0], [0, 0, 0, 1]], new_tokens=1),
        make_record("b", [4, 5], [0, 1], [[0, 2, 0, 0], [0, 0, 0, 2]]),
    ]
    predictor.fit(records)
    counts = np.array([[3, 3, 0, 0], [1, 1, 1, 3]], dtype=float)
    expected = (counts + 0.5) / (counts.sum(axis=1, keepdims=True) + 4 * 0.5)
    np.testing.assert_allclose(predictor.layer_posterior(), expected)
    forecast = predictor.forecast(records[0].features())
    np.testing.assert_allclose(forecast.distribution, expected)
    np.testing.assert_allclose(forecast.load, expected * (3 + 1) * 1)


def test_token_tables_from_routing_with_backoff_to_the_layer_prior():
    predictor = BayesianPopularity(SHAPE, token_prior_strength=2.0, exploration_initial=0.0)
    for index in range(6):
        predictor.observe_record(routed_record(index, [5, 7], [[2, 1], [0, 3]]))
    layer_prior = predictor.layer_posterior()
    token_five = np.zeros((2, 4))
    token_five[0, 2] = token_five[1, 1] = 6.0
    expected_five = (token_five + 2.0 * layer_prior) / (6.0 + 2.0)
    np.testing.assert_allclose(predictor.token_posterior(np.array([5]))[0], expected_five)
    only_five = routed_record(99, [5], [[2, 1]]).features()
    np.testing.assert_allclose(predictor.forecast(only_five).distribution, expected_five)
    unknown = routed_record(98, [42], [[0, 0]]).features()
    np.testing.assert_allclose(predictor.forecast(unknown).distribution, layer_prior)


def test_prompt_counts_are_attributed_to_tokens_without_routing():
    """Without per-token routing, EM attribution still learns which token goes where."""
    predictor = BayesianPopularity(SHAPE, exploration_initial=0.0)
    for index in range(30):
        for tokens, routing in (([5, 5], [[2, 1], [2, 1]]), ([7], [[0, 3]]), ([5, 7], [[2, 1], [0, 3]])):
            record = routed_record(index, tokens, routing)
            predictor.observe(record.features(), record.activation())  # counts only
    table = predictor.token_posterior(np.array([5, 7]))
    assert table[0, 0, 2] > 0.8 and table[0, 1, 1] > 0.8
    assert table[1, 0, 0] > 0.8 and table[1, 1, 3] > 0.8


def test_exploration_decays_and_decays_slower_where_error_is_large():
    steady = BayesianPopularity(SHAPE, use_token_ids=False, exploration_initial=0.3, exploration_decay=0.2)
    erratic = BayesianPopularity(SHAPE, use_token_ids=False, exploration_initial=0.3, exploration_decay=0.2)
    np.testing.assert_allclose(steady.exploration_rates(), 0.3)
    rng = np.random.default_rng(0)
    for index in range(40):
        steady.observe_record(make_record(f"s{index}", range(50), [0, 1], [[25, 25, 0, 0], [0, 0, 25, 25]]))
        hot = rng.integers(4, size=2)
        prefill = np.zeros((2, 4), int)
        prefill[0, hot[0]] = prefill[1, hot[1]] = 50
        erratic.observe_record(make_record(f"e{index}", range(50), [0, 1], prefill))
    np.testing.assert_allclose(steady.exploration_rates(), 0.3 / (1 + 0.2 * 40))
    assert np.all(erratic.exploration_rates() > 2 * steady.exploration_rates())
    forecast = steady.forecast(make_record("p", range(50), [0, 1], [[0] * 4] * 2).features())
    rate = 0.3 / (1 + 0.2 * 40)
    exploration = steady.exploration_distribution()
    np.testing.assert_allclose(forecast.distribution, (1 - rate) * steady.layer_posterior() + rate * exploration)
    assert exploration[0, 2] > exploration[0, 0]  # unseen experts get more of the exploration mass


def test_confidence_grows_with_evidence_and_request_size():
    predictor = BayesianPopularity(SHAPE, use_token_ids=False)
    constant = [[10, 10, 0, 0], [0, 0, 10, 10]]
    assert predictor.forecast(make_record("x", range(20), [0, 1], constant).features()).confidence == 0.0
    predictor.observe_record(make_record("a0", range(20), [0, 1], constant))
    early = predictor.forecast(make_record("x", range(20), [0, 1], constant).features()).confidence
    for index in range(1, 50):
        predictor.observe_record(make_record(f"a{index}", range(20), [0, 1], constant))
    later_short = predictor.forecast(make_record("x", range(3), [0, 1], constant).features()).confidence
    later_long = predictor.forecast(make_record("x", range(200), [0, 1], constant).features()).confidence
    assert early < later_long and later_short < later_long
    assert 0.0 <= later_short <= 1.0


def test_rejects_unknown_exploration_mode():
    with pytest.raises(ValueError):
        BayesianPopularity(SHAPE, exploration="random")
