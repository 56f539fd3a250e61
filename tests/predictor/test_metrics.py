"""Metric definitions on cases whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from predictor.metrics import (
    calibration_bins,
    js_divergence,
    load_error,
    precision_recall,
    set_matches,
    slot_coverage,
    spearman,
    top_k_precision,
    top_k_recall,
)


def test_js_divergence_is_in_nats():
    p = np.array([[0.5, 0.5, 0.0, 0.0]])
    assert js_divergence(p, p) == pytest.approx([0.0], abs=1e-12)
    disjoint = np.array([[0.0, 0.0, 0.5, 0.5]])
    assert js_divergence(p, disjoint) == pytest.approx([math.log(2)])  # ln 2 nats = 1 bit
    counts = np.array([[2, 2, 0, 0]])  # unnormalised counts are normalised first
    assert js_divergence(counts, p) == pytest.approx([0.0], abs=1e-12)
    assert js_divergence(p, np.array([[0.25, 0.25, 0.25, 0.25]]))[0] == pytest.approx(
        0.5 * (0.5 * math.log(0.5 / 0.375) * 2) + 0.5 * (0.25 * math.log(0.25 / 0.375) * 2 + 0.25 * math.log(2) * 2)
    )


def test_js_divergence_batches_over_leading_axes():
    p = np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 2))
    assert js_divergence(p, p).shape == (3, 2)


def test_recall_precision_and_coverage_by_hand():
    predicted = np.array([[0.4, 0.3, 0.2, 0.1]])
    actual = np.array([[5, 0, 3, 2]])  # actual top-2 = {0, 2}; experts used = {0, 2, 3}
    assert top_k_recall(predicted, actual, 2) == pytest.approx([0.5])  # predicted {0, 1}
    assert top_k_precision(predicted, actual, 2) == pytest.approx([0.5])  # expert 1 unused
    assert slot_coverage(predicted, actual, 2) == pytest.approx([0.5])  # 5 of 10 slots
    assert slot_coverage(predicted, actual, 3) == pytest.approx([0.8])
    only_one_used = np.array([[0, 0, 7, 0]])
    assert top_k_recall(predicted, only_one_used, 3) == pytest.approx([1.0])  # expert 2 found


def test_load_error_and_set_scores():
    assert load_error(np.array([[1.0, 3.0]]), np.array([[2.0, 1.0]])) == pytest.approx(1.5)
    matches = set_matches({(0, 1), (1, 2)}, {(0, 1), (1, 3), (1, 0)})
    assert matches == (1, 2, 3)
    assert precision_recall(*matches) == pytest.approx((0.5, 1 / 3))
    assert precision_recall(0, 0, 0) == (1.0, 1.0)


def test_spearman_and_calibration():
    assert spearman([1, 2, 3, 4], [8, 6, 4, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rows = calibration_bins(np.array([0.1, 0.9, 0.5, 0.7]), np.array([0.4, 0.1, 0.3, 0.2]), bins=2)
    assert [row["count"] for row in rows] == [2, 2]
    assert rows[0]["mean_error"] == pytest.approx(0.35) and rows[1]["mean_error"] == pytest.approx(0.15)
    assert rows[0]["confidence_high"] <= rows[1]["confidence_low"]
