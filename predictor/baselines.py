"""Prompt-blind baselines: a moving average of popularity and a recent-use set.

Sources: DeepSeek's EPLB README leaves load prediction out of scope and suggests a moving
average of historical expert load (STYLE.md, example 12); Remoe's DOP baseline is the same
history-only idea. Recent use follows CPU-offload practice, where a cache of the experts used
by recent requests served about two thirds of expert calls while a fixed hot list served about
a tenth. Neither looks at the prompt, which is what the other predictors must beat.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from predictor.base import (
    ModelShape,
    Predictor,
    activation_distribution,
    build_forecast,
    expected_token_slots,
    sampling_confidence,
    total_variation,
)
from predictor.forecast import Activation, Forecast, PromptFeatures


class MovingAverage(Predictor):
    """Exponential moving average of each layer's expert popularity.

    average [layers, experts]: rows sum to 1. Update ``average += rate * (actual - average)``
    with ``rate = max(smoothing, 1 / observations)`` (a plain running mean until 1/smoothing
    requests have been seen, so early forecasts are not pulled toward uniform).
    Confidence = stability of recent history: ``1 - EMA of the total-variation distance between
    each new request's distribution and the average`` x sampling confidence of the request size.
    """

    name = "moving-average"

    def __init__(self, shape: ModelShape, seed: int = 0, smoothing: float = 0.1) -> None:
        super().__init__(shape, seed)
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"MovingAverage: smoothing {smoothing} outside (0, 1]")
        self.smoothing = smoothing
        self.average = np.full(shape.matrix_shape, 1.0 / shape.experts)
        self.deviation = 1.0  # EMA of total variation between requests and the average

    def forecast(self, features: PromptFeatures) -> Forecast:
        stability = 0.0 if self.observations == 0 else 1.0 - self.deviation
        confidence = stability * sampling_confidence(
            self.average, expected_token_slots(features, self.shape.top_k)
        )
        return build_forecast(self.average.copy(), features, self.shape, confidence, self.name)

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self.check_activation(actual)
        distribution = activation_distribution(actual)
        self.observations += 1
        rate = max(self.smoothing, 1.0 / self.observations)
        if self.observations > 1:
            deviation = float(total_variation(distribution, self.average).mean())
            self.deviation += rate * (deviation - self.deviation)
        self.average += rate * (distribution - self.average)


class RecentUse(Predictor):
    """Per layer, the set of experts used by the last ``window`` requests.

    An expert counts as used by a request when it got more than ``min_share`` of the layer's
    token-slots (default: any slot). weighting ``"uniform"``: the forecast is uniform over the
    set; ``"recency"``: each expert weighs ``sum over recent requests using it of decay**age``
    (age 0 = the latest). Confidence = mean Jaccard overlap of consecutive requests' sets in
    the window (a stable working set is predictable) x sampling confidence.
    """

    name = "recent-use"

    def __init__(
        self,
        shape: ModelShape,
        seed: int = 0,
        window: int = 4,
        weighting: str = "recency",
        decay: float = 0.5,
        min_share: float = 0.0,
    ) -> None:
        super().__init__(shape, seed)
        if window < 1:
            raise ValueError(f"RecentUse: window must be >= 1, got {window}")
        if weighting not in ("uniform", "recency"):
            raise ValueError(f"RecentUse: weighting must be 'uniform' or 'recency', got {weighting!r}")
        self.window = window
        self.weighting = weighting
        self.decay = decay
        self.min_share = min_share
        self.recent: deque[np.ndarray] = deque(maxlen=window)  # newest last, each [layers, experts] bool

    def used_experts(self) -> np.ndarray:
        """[layers, experts] bool: experts used by any of the recent requests."""
        if not self.recent:
            return np.zeros(self.shape.matrix_shape, dtype=bool)
        return np.logical_or.reduce(list(self.recent))

    def forecast(self, features: PromptFeatures) -> Forecast:
        if not self.recent:
            return build_forecast(np.ones(self.shape.matrix_shape), features, self.shape, 0.0, self.name)
        if self.weighting == "uniform":
            weights = self.used_experts().astype(np.float64)
        else:
            ages = range(len(self.recent) - 1, -1, -1)  # oldest first, like self.recent
            weights = sum(self.decay**age * used for age, used in zip(ages, self.recent))
        confidence = self._stability() * sampling_confidence(
            weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12),
            expected_token_slots(features, self.shape.top_k),
        )
        return build_forecast(np.asarray(weights, dtype=np.float64), features, self.shape, confidence, self.name)

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self.check_activation(actual)
        used = activation_distribution(actual) > self.min_share
        used &= actual.total > 0
        self.recent.append(used)
        self.observations += 1

    def _stability(self) -> float:
        if len(self.recent) < 2:
            return 0.5
        overlaps = []
        sets = list(self.recent)
        for older, newer in zip(sets[:-1], sets[1:]):
            union = np.logical_or(older, newer).sum(axis=1)
            both = np.logical_and(older, newer).sum(axis=1)
            overlaps.append(np.where(union > 0, both / np.maximum(union, 1), 1.0).mean())
        return float(np.mean(overlaps))
