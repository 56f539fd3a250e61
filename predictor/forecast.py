"""The one type every predictor returns and every allocator policy consumes.

Shapes use the model's MoE layers only (dense layers are not counted):
``[layers, experts]`` where ``layers`` = number of MoE layers, ``experts`` = routed experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PromptFeatures:
    """What a predictor may look at before the request runs.

    token_ids:        [n_prompt] int64 prompt token ids
    token_embeddings: [n_prompt, d] float32, the model's input-embedding rows of the prompt
    embedding:        [d] float32, the prompt's mean input embedding (or a sentence embedding)
    expected_new_tokens: how many tokens the request will decode (its max_new_tokens)
    """

    token_ids: np.ndarray
    token_embeddings: np.ndarray
    embedding: np.ndarray
    expected_new_tokens: int = 0
    text: str = ""


@dataclass(frozen=True)
class Activation:
    """What really happened: token-slot counts per (MoE layer, expert).

    prefill: [layers, experts] int64, tokens of the prompt routed to each expert
    decode:  [layers, experts] int64, generated tokens routed to each expert
    """

    prefill: np.ndarray
    decode: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.prefill + self.decode


@dataclass(frozen=True)
class Forecast:
    """A predictor's expectation for one request.

    distribution: [layers, experts] float64, each row sums to 1: the expected share of the
                  layer's routed token-slots that each expert receives.
    load:         [layers, experts] float64, expected token-slots per expert for the whole
                  request (prefill + decode), i.e. distribution * tokens * top_k.
    confidence:   in [0, 1]; how much the forecast can be trusted (calibrated in predictor-eval).
    stragglers:   (layer, expert) pairs expected to be overloaded.
    source:       name of the predictor that made it.
    """

    distribution: np.ndarray
    load: np.ndarray
    confidence: float
    stragglers: tuple[tuple[int, int], ...] = ()
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.distribution.ndim != 2 or self.distribution.shape != self.load.shape:
            raise ValueError(
                f"Forecast: distribution {self.distribution.shape} and load {self.load.shape} "
                "must both be [layers, experts]"
            )
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"Forecast: confidence {self.confidence} outside [0, 1]")

    @property
    def layers(self) -> int:
        return self.distribution.shape[0]

    @property
    def experts(self) -> int:
        return self.distribution.shape[1]

    @staticmethod
    def uniform(layers: int, experts: int, tokens: float, top_k: int, source: str = "uniform") -> Forecast:
        dist = np.full((layers, experts), 1.0 / experts)
        return Forecast(dist, dist * tokens * top_k, 0.0, (), source)
