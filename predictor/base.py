"""The one interface every predictor implements, and the helpers they share.

A predictor is built with a :class:`ModelShape` and a seed, learns from finished requests
(:meth:`Predictor.observe`), and forecasts a new request from what is known before it runs
(:meth:`Predictor.forecast`). Every forecast is a ``predictor.forecast.Forecast``:

    distribution  [layers, experts]  each row sums to 1
    load          [layers, experts]  distribution * (n_prompt + expected_new_tokens) * top_k

Shapes count MoE layers only. As EPLB's README suggests for load prediction, the baseline is a
moving average behind this same small interface (``predictor/baselines.py``); every predictor is
deterministic under its seed (STYLE.md, example 12).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from predictor.forecast import Activation, Forecast, PromptFeatures

if TYPE_CHECKING:
    from predictor.traces import TraceRecord

# MoEless-style straggler rule (PAPERS.md §3.2): predicted load above theta x the layer mean.
DEFAULT_STRAGGLER_THRESHOLD = 1.5


@dataclass(frozen=True)
class ModelShape:
    """The routed-expert geometry of a model: ``layers`` MoE layers of ``experts`` experts,
    each token routed to ``top_k`` of them."""

    layers: int
    experts: int
    top_k: int

    def __post_init__(self) -> None:
        if self.layers < 1 or self.experts < 1:
            raise ValueError(f"ModelShape: layers={self.layers}, experts={self.experts} must be >= 1")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"ModelShape: top_k={self.top_k} must be in [1, experts={self.experts}]")

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(layers, experts)``, the shape of every per-request matrix."""
        return (self.layers, self.experts)


class Predictor(ABC):
    """Forecasts per-(layer, expert) activation of a request before it runs.

    Subclasses set the class attribute ``name`` and implement :meth:`forecast` and
    :meth:`observe`. :meth:`observe_record` is the hook for predictors that can use more of a
    trace than ``PromptFeatures`` holds (per-layer gate inputs, per-token routing).
    """

    name: str = "predictor"

    def __init__(self, shape: ModelShape, seed: int = 0) -> None:
        self.shape = shape
        self.seed = seed
        self.observations = 0

    @abstractmethod
    def forecast(self, features: PromptFeatures) -> Forecast:
        """Expected activation of the request described by ``features``."""

    @abstractmethod
    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        """Learn from one finished request. Implementations increment ``self.observations``."""

    def observe_record(self, record: TraceRecord) -> None:
        """Learn from one stored trace record; the default uses only its features and counts."""
        self.observe(record.features(), record.activation())

    def fit(self, records: Iterable[TraceRecord]) -> None:
        """Observe every record, in order."""
        for record in records:
            self.observe_record(record)

    def check_activation(self, actual: Activation) -> None:
        """Raise ``ValueError`` when ``actual`` is not ``[layers, experts]`` for this model."""
        for part_name, part in (("prefill", actual.prefill), ("decode", actual.decode)):
            if part.shape != self.shape.matrix_shape:
                raise ValueError(
                    f"{self.name}: activation {part_name} has shape {part.shape}, "
                    f"expected {self.shape.matrix_shape}"
                )


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; negative entries are clipped to 0 first.

    matrix: [layers, experts] (or any [rows, columns]); a row summing to 0 becomes uniform.
    Returns a new float64 array of the same shape.
    """
    clipped = np.clip(np.asarray(matrix, dtype=np.float64), 0.0, None)
    if clipped.ndim == 1:
        return normalise_rows(clipped[None, :])[0]
    sums = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / clipped.shape[1])
    safe_sums = np.where(sums > 0, sums, 1.0)
    return np.where(sums > 0, clipped / safe_sums, uniform)


def activation_distribution(actual: Activation) -> np.ndarray:
    """The request's true distribution: ``total`` counts normalised per layer, [layers, experts]."""
    return normalise_rows(actual.total)


def expected_token_slots(features: PromptFeatures, top_k: int) -> float:
    """Routed token-slots per layer the request is expected to use:
    ``(n_prompt + expected_new_tokens) * top_k``."""
    return float((len(features.token_ids) + max(features.expected_new_tokens, 0)) * top_k)


def stragglers_from_load(
    load: np.ndarray, threshold: float = DEFAULT_STRAGGLER_THRESHOLD
) -> tuple[tuple[int, int], ...]:
    """(layer, expert) pairs whose load exceeds ``threshold`` x that layer's mean load.

    load: [layers, experts]. A layer with zero load has no stragglers.
    """
    layer_mean = load.mean(axis=1, keepdims=True)
    mask = (load > threshold * layer_mean) & (layer_mean > 0)
    return tuple((int(layer), int(expert)) for layer, expert in zip(*np.nonzero(mask)))


def expected_sampling_total_variation(distribution: np.ndarray, slots: float) -> np.ndarray:
    """Expected total-variation distance between ``distribution`` and the empirical shares of
    ``slots`` draws from it, per layer (normal approximation of the multinomial):
    ``0.5 * sum_e sqrt(2/pi) * sqrt(p_e (1 - p_e) / slots)``.

    This is the error no predictor can avoid: a forecast of a 3-token request is less
    trustworthy than one of a 300-token request. distribution: [layers, experts] -> [layers].
    """
    if slots <= 0:
        return np.ones(distribution.shape[0])
    spread = np.sqrt(distribution * (1.0 - distribution) / slots)
    return np.clip(0.5 * math.sqrt(2.0 / math.pi) * spread.sum(axis=1), 0.0, 1.0)


def sampling_confidence(distribution: np.ndarray, slots: float) -> float:
    """``1 - mean expected sampling total variation`` over layers, in [0, 1]."""
    return float(np.clip(1.0 - expected_sampling_total_variation(distribution, slots).mean(), 0.0, 1.0))


def build_forecast(
    distribution: np.ndarray,
    features: PromptFeatures,
    shape: ModelShape,
    confidence: float,
    source: str,
    straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    extra: dict | None = None,
) -> Forecast:
    """A ``Forecast`` from a distribution and the request's expected token count.

    distribution: [layers, experts], normalised here. load = distribution *
    (n_prompt + expected_new_tokens) * top_k. Stragglers use ``straggler_threshold`` x layer mean.
    """
    if distribution.shape != shape.matrix_shape:
        raise ValueError(f"{source}: distribution {distribution.shape}, expected {shape.matrix_shape}")
    normalised = normalise_rows(distribution)
    load = normalised * expected_token_slots(features, shape.top_k)
    return Forecast(
        distribution=normalised,
        load=load,
        confidence=float(np.clip(confidence, 0.0, 1.0)),
        stragglers=stragglers_from_load(load, straggler_threshold),
        source=source,
        extra=extra or {},
    )


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance per row, in [0, 1]: ``0.5 * sum |p - q|``. p, q: [rows, columns]."""
    return 0.5 * np.abs(p - q).sum(axis=-1)
