"""The oracle: returns what really happened. The upper bound every predictor is compared with.

Remoe, Liu et al. and MoEless all report against a "real distribution" oracle (PAPERS.md
§1.6, §2.5, §3.2). It is built from a mapping prompt -> ``Activation``; keys are the prompt's
token ids as a tuple of ints, or its text. Its load is the true count matrix (not the
distribution x token formula) and its confidence is 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from predictor.base import (
    DEFAULT_STRAGGLER_THRESHOLD,
    ModelShape,
    Predictor,
    normalise_rows,
    stragglers_from_load,
)
from predictor.forecast import Activation, Forecast, PromptFeatures
from predictor.traces import TraceRecord

PromptKey = tuple[int, ...] | str


def token_key(features: PromptFeatures) -> tuple[int, ...]:
    return tuple(int(token) for token in features.token_ids.tolist())


class OraclePredictor(Predictor):
    """Looks the prompt up (by token ids, then by text); ``KeyError`` for an unknown prompt."""

    name = "oracle"

    def __init__(
        self,
        shape: ModelShape,
        truth: Mapping[PromptKey, Activation] | None = None,
        seed: int = 0,
        straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    ) -> None:
        super().__init__(shape, seed)
        self.truth: dict[PromptKey, Activation] = dict(truth or {})
        self.straggler_threshold = straggler_threshold

    @classmethod
    def from_records(cls, shape: ModelShape, records: Iterable[TraceRecord]) -> OraclePredictor:
        return cls(shape, {token_key(record.features()): record.activation() for record in records})

    def lookup(self, features: PromptFeatures) -> Activation:
        key = token_key(features)
        if key in self.truth:
            return self.truth[key]
        if features.text and features.text in self.truth:
            return self.truth[features.text]
        raise KeyError(f"oracle: no recorded activation for prompt {features.text[:60]!r} ({len(key)} tokens)")

    def forecast(self, features: PromptFeatures) -> Forecast:
        actual = self.lookup(features)
        load = actual.total.astype(np.float64)
        return Forecast(
            distribution=normalise_rows(load),
            load=load,
            confidence=1.0,
            stragglers=stragglers_from_load(load, self.straggler_threshold),
            source=self.name,
        )

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self.check_activation(actual)
        self.truth[token_key(features)] = actual
        self.observations += 1
