"""Accuracy metrics for activation forecasts: pure numpy/scipy functions.

Sources: Remoe scores forecasts by Jensen-Shannon divergence (PAPERS.md §1.6, R1) and checks
that prompt similarity tracks activation similarity (its Fig. 3); Liu et al. score by mean
|real - predicted| tokens per expert (§2.5, L1); MoEless by straggler recall/precision (§6, M1).

Conventions: matrices are [layers, experts]; JS divergence is in nats (natural log), so it is
0 for identical distributions and ln 2 ~= 0.693 for disjoint ones (divide by ln 2 for bits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import scipy.stats

LN2 = math.log(2.0)


def _normalise_last_axis(values: np.ndarray) -> np.ndarray:
    """Scale to sum 1 along the last axis (a zero vector becomes uniform)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    sums = values.sum(axis=-1, keepdims=True)
    return np.where(sums > 0, values / np.where(sums > 0, sums, 1.0), 1.0 / values.shape[-1])


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in nats along the last axis, in [0, ln 2].

    p, q: [..., experts] non-negative; each is normalised along the last axis first.
    """
    p, q = _normalise_last_axis(p), _normalise_last_axis(q)
    middle = 0.5 * (p + q)

    def kl_to_middle(a: np.ndarray) -> np.ndarray:
        safe = np.where(a > 0, a, 1.0) / np.where(middle > 0, middle, 1.0)
        return np.sum(np.where(a > 0, a * np.log(safe), 0.0), axis=-1)

    return np.clip(0.5 * kl_to_middle(p) + 0.5 * kl_to_middle(q), 0.0, LN2)


def top_experts(matrix: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest entries per row, [layers, count] (ties: lower index first)."""
    return np.argsort(-matrix, axis=1, kind="stable")[:, :count]


def _as_masks(indices: np.ndarray, experts: int) -> np.ndarray:
    mask = np.zeros((indices.shape[0], experts), dtype=bool)
    np.put_along_axis(mask, indices, True, axis=1)
    return mask


def top_k_recall(predicted: np.ndarray, actual_counts: np.ndarray, k: int) -> np.ndarray:
    """Per layer, share of the actual top-k experts (those with any slot) in the predicted top-k.

    predicted: [layers, experts] distribution or load; actual_counts: [layers, experts]. -> [layers]
    """
    experts = predicted.shape[1]
    predicted_set = _as_masks(top_experts(predicted, k), experts)
    actual_set = _as_masks(top_experts(actual_counts, k), experts) & (actual_counts > 0)
    hits = (predicted_set & actual_set).sum(axis=1)
    return np.where(actual_set.sum(axis=1) > 0, hits / np.maximum(actual_set.sum(axis=1), 1), 1.0)


def top_k_precision(predicted: np.ndarray, actual_counts: np.ndarray, k: int) -> np.ndarray:
    """Per layer, share of the predicted top-k experts that the request used at all. -> [layers]"""
    predicted_set = _as_masks(top_experts(predicted, k), predicted.shape[1])
    return (predicted_set & (actual_counts > 0)).sum(axis=1) / k


def slot_coverage(predicted: np.ndarray, actual_counts: np.ndarray, m: int) -> np.ndarray:
    """Per layer, share of the request's token-slots that fall on the predicted top-m experts:
    the hit rate of a cache (or of local placement) holding those m experts. -> [layers]"""
    predicted_set = _as_masks(top_experts(predicted, m), predicted.shape[1])
    totals = actual_counts.sum(axis=1)
    covered = np.where(predicted_set, actual_counts, 0).sum(axis=1)
    return np.where(totals > 0, covered / np.maximum(totals, 1), 1.0)


def load_error(predicted_load: np.ndarray, actual_load: np.ndarray) -> float:
    """Mean |predicted - actual| token-slots per (layer, expert), as Liu et al. report."""
    return float(np.abs(predicted_load - actual_load).mean())


def set_matches(predicted: Iterable, actual: Iterable) -> tuple[int, int, int]:
    """(true positives, predicted count, actual count) of two sets, for micro-averaged scores."""
    predicted_set, actual_set = set(predicted), set(actual)
    return len(predicted_set & actual_set), len(predicted_set), len(actual_set)


def precision_recall(true_positives: int, predicted: int, actual: int) -> tuple[float, float]:
    """Micro-averaged (precision, recall); 1.0 when there was nothing to predict / find."""
    precision = true_positives / predicted if predicted else 1.0
    recall = true_positives / actual if actual else 1.0
    return precision, recall


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Spearman rank correlation, NaN when either side is constant or has < 3 points."""
    x_array, y_array = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    if len(x_array) < 3 or np.ptp(x_array) == 0 or np.ptp(y_array) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x_array, y_array).statistic)


def calibration_bins(confidence: np.ndarray, error: np.ndarray, bins: int = 5) -> list[dict]:
    """Forecast error against confidence: ``bins`` equal-count groups sorted by confidence.

    Returns rows {confidence_low, confidence_high, mean_confidence, mean_error, count}; a
    meaningful confidence shows mean_error falling as confidence rises.
    """
    confidence, error = np.asarray(confidence, float), np.asarray(error, float)
    order = np.argsort(confidence, kind="stable")
    rows = []
    for group in np.array_split(order, min(bins, max(len(order), 1))):
        if len(group) == 0:
            continue
        rows.append(
            {
                "confidence_low": float(confidence[group].min()),
                "confidence_high": float(confidence[group].max()),
                "mean_confidence": float(confidence[group].mean()),
                "mean_error": float(error[group].mean()),
                "count": int(len(group)),
            }
        )
    return rows
