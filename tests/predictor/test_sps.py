"""Remoe's SPS: the SCS identity, the clustering tree, and forecasts on two prompt clusters."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.base import ModelShape
from predictor.sps import (
    BruteForceIndex,
    SPSIndex,
    SPSPredictor,
    prompt_vector,
    soft_cosine_similarity,
)
from predictor.synthetic import clustered_embeddings
from tests.predictor.builders import make_record

SHAPE = ModelShape(layers=2, experts=4, top_k=1)


def test_scs_equals_cosine_of_summed_unit_embeddings():
    rng = np.random.default_rng(0)
    for n1, n2 in ((5, 3), (1, 7), (4, 4)):
        first, second = rng.normal(size=(n1, 8)), rng.normal(size=(n2, 8)) * 3.0
        literal = soft_cosine_similarity(first, second)
        assert prompt_vector(first) @ prompt_vector(second) == pytest.approx(literal, abs=1e-7)
    same = rng.normal(size=(3, 8))
    assert soft_cosine_similarity(same, same) == pytest.approx(1.0, abs=1e-7)


def cluster_record(index: int, cluster: int, rng: np.random.Generator):
    """Cluster 0 prompts point along axis 0 and use experts {0, 1}; cluster 1: axis 1, {2, 3}."""
    direction = np.eye(6)[cluster]
    n_tokens = int(rng.integers(3, 8))
    token_embeddings = direction + 0.2 * rng.normal(size=(n_tokens, 6))
    experts = [0, 1] if cluster == 0 else [2, 3]
    prefill = np.zeros((2, 4), dtype=int)
    for layer in range(2):
        prefill[layer, experts] = rng.multinomial(n_tokens, [0.6, 0.4])
    return make_record(
        f"c{cluster}-{index}", np.arange(n_tokens), token_embeddings.mean(0), prefill,
        token_embeddings=token_embeddings,
    )


@pytest.mark.parametrize("index_kind", ["tree", "brute"])
def test_forecasts_the_expert_set_of_the_prompts_cluster(index_kind):
    rng = np.random.default_rng(1)
    predictor = SPSPredictor(SHAPE, seed=0, alpha=5, leaf_size=8, fan_out=2, index=index_kind)
    for index in range(40):
        predictor.observe_record(cluster_record(index, index % 2, rng))
    new_a = cluster_record(100, 0, rng)
    forecast = predictor.forecast(new_a.features())
    for layer in range(2):
        assert set(np.argsort(-forecast.distribution[layer])[:2]) == {0, 1}
        assert forecast.distribution[layer, 2:].sum() == pytest.approx(0.0, abs=1e-6)
    new_b = predictor.forecast(cluster_record(101, 1, rng).features())
    assert set(np.argsort(-new_b.distribution[0])[:2]) == {2, 3}
    # A prompt unlike both clusters is forecast with less confidence.
    stranger = make_record("s", [0, 1], np.eye(6)[4], [[1, 0, 0, 0], [1, 0, 0, 0]], token_embeddings=np.eye(6)[[4, 5]])
    assert predictor.forecast(stranger.features()).confidence < forecast.confidence


def test_empty_predictor_forecasts_uniform_with_zero_confidence():
    forecast = SPSPredictor(SHAPE).forecast(cluster_record(0, 0, np.random.default_rng(0)).features())
    np.testing.assert_allclose(forecast.distribution, 0.25)
    assert forecast.confidence == 0.0


def test_tree_search_equals_brute_force_while_one_leaf():
    vectors = clustered_embeddings(100, 16, clusters=5, seed=2)
    tree, brute = SPSIndex(16, leaf_size=150), BruteForceIndex(16)
    for index, vector in enumerate(vectors):
        tree.insert(vector, index)
        brute.insert(vector, index)
    probe = clustered_embeddings(1, 16, clusters=5, seed=3)[0]
    assert [i for i, _ in tree.search(probe, 15)] == [i for i, _ in brute.search(probe, 15)]


def test_small_leaves_are_topped_up_from_siblings():
    vectors = clustered_embeddings(40, 8, clusters=8, seed=4)
    index = SPSIndex(8, fan_out=4, leaf_size=6, seed=0)
    for position, vector in enumerate(vectors):
        index.insert(vector, position)
    assert index.depth() > 1 and max(index.leaf_sizes()) <= 6
    found = index.search(vectors[0], 10)
    assert len(found) == 10 and found[0][0] == 0 and found[0][1] == pytest.approx(1.0)
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)


def test_insert_and_search_work_is_sub_linear():
    """Similarity evaluations (not wall time) per insert and per search grow far slower than n."""
    work = {}
    for n in (500, 4000):
        vectors = clustered_embeddings(n + 50, 16, clusters=40, seed=5)
        index = SPSIndex(16, seed=0)
        for position in range(n):
            index.insert(vectors[position], position)
        insert_work = index.similarity_evaluations / n
        assert max(index.leaf_sizes()) <= 150
        before = index.similarity_evaluations
        for probe in vectors[n:]:
            assert len(index.search(probe, 15)) == 15
        work[n] = ((index.similarity_evaluations - before) / 50, insert_work)
    search_small, insert_small = work[500]
    search_large, insert_large = work[4000]
    assert search_large < 0.1 * 4000  # a brute-force search would do 4000
    assert search_large < 3 * search_small  # 8x the prompts, far less than 8x the work
    assert insert_large < 3 * insert_small


def test_offline_build_matches_online_quality():
    vectors = clustered_embeddings(2000, 16, clusters=20, seed=6)
    built = SPSIndex.build(vectors[:1950], list(range(1950)), seed=0)
    assert len(built) == 1950 and max(built.leaf_sizes()) <= 150
    brute = BruteForceIndex(16)
    for position, vector in enumerate(vectors[:1950]):
        brute.insert(vector, position)
    ratios = []
    for probe in vectors[1950:]:
        tree_best = np.mean([s for _, s in built.search(probe, 15)])
        exact_best = np.mean([s for _, s in brute.search(probe, 15)])
        ratios.append(tree_best / exact_best)
    assert np.mean(ratios) > 0.95


def test_near_duplicates_do_not_split_forever():
    index = SPSIndex(4, leaf_size=10, seed=0)
    for position in range(60):
        index.insert(np.array([1.0, 0.0, 0.0, 0.0]), position)
    assert len(index) == 60 and len(index.search(np.array([1.0, 0, 0, 0]), 15)) == 15


def test_same_seed_same_forecasts(synthetic_model, synthetic_split):
    train, test = synthetic_split
    first = SPSPredictor(synthetic_model.shape, seed=3, leaf_size=20)
    second = SPSPredictor(synthetic_model.shape, seed=3, leaf_size=20)
    first.fit(train[:200])
    second.fit(train[:200])
    for record in test[:10]:
        np.testing.assert_array_equal(
            first.forecast(record.features()).distribution, second.forecast(record.features()).distribution
        )
