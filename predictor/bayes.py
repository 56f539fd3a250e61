"""Bayesian expert popularity with token-id conditioning and multi-dimensional epsilon-greedy.

Source: Liu, Wang, Wu, "distributed MoE deployment on serverless" (arXiv 2501.05313), PAPERS.md
§2.3 B1/B2 (token-feature tables, posterior given the token id) and B6 (a decaying exploration
vector ``eps_t = eps_0 / (1 + rho t)`` whose decay slows where the observed error is large).

Model [D]:
- Per layer l a Dirichlet posterior over the expert a token-slot picks:
  ``P_l(e) = (alpha + n_l[e]) / (E alpha + sum_e n_l[e])`` with ``n_l`` the observed
  (prefill + decode) token-slot counts and ``alpha`` the per-expert prior pseudo-count.
- Optionally conditioned on the prompt's token ids (only f1 of the paper's three features is
  known before the run, as in B2): a table of per-token slot counts ``n_v`` with backoff to the
  layer posterior, ``P(e | v, l) = (n_v[l, e] + kappa P_l(e)) / (N_v[l] + kappa)``. The
  request's forecast is the mean of ``P(. | v_i, l)`` over its prompt tokens; generated tokens
  are assumed to route like the prompt.
- Tables learn from exact per-token routing when a trace has it (``TraceRecord.token_routing``);
  otherwise each prompt's prefill counts are attributed to its tokens in proportion to the
  current ``P(e | v)`` (one online EM step per request; the first requests split evenly).
- Exploration: ``forecast = (1 - eps_l) posterior + eps_l explore_l``, with explore_l uniform or
  favouring under-observed experts (``1 / sqrt(1 + n_l[e])``), and per layer
  ``eps_l = eps_0 (1 + rho'_l t) / (1 + rho t)``: rho'_l = rho1 when the layer's error (EMA of
  the total-variation distance between forecast and actual, less the part that sampling noise
  of the request's size explains) exceeds twice ``error_threshold``, rho2 when it exceeds it,
  0 otherwise (the paper's rho1..rho3 cases are about memory and payload, which a predictor
  cannot see; the paper's test is |predicted - real| > alpha).
  Deterministic; the seed is kept for the interface.
Confidence: posterior-predictive concentration: 1 - the expected total-variation error implied by
Dirichlet concentration A and request size n, ``0.5 sqrt(2/pi) sum_e sqrt(p(1-p)(1/(A+1) + 1/n))``,
times (1 - mean eps).
"""

from __future__ import annotations

import math

import numpy as np

from predictor.base import (
    ModelShape,
    Predictor,
    build_forecast,
    expected_sampling_total_variation,
    expected_token_slots,
    normalise_rows,
    total_variation,
)
from predictor.forecast import Activation, Forecast, PromptFeatures
from predictor.traces import TraceRecord


class BayesianPopularity(Predictor):
    """Dirichlet popularity per layer, P(expert | token id) tables, epsilon-greedy exploration."""

    name = "bayes"

    def __init__(
        self,
        shape: ModelShape,
        seed: int = 0,
        prior_strength: float = 1.0,
        token_prior_strength: float = 4.0,
        use_token_ids: bool = True,
        exploration_initial: float = 0.3,
        exploration_decay: float = 0.2,
        slow_decay: tuple[float, float] = (0.1, 0.05),
        error_threshold: float = 0.05,
        error_smoothing: float = 0.2,
        exploration: str = "under-observed",
    ) -> None:
        super().__init__(shape, seed)
        if exploration not in ("uniform", "under-observed"):
            raise ValueError(f"BayesianPopularity: exploration {exploration!r}: use 'uniform' or 'under-observed'")
        if prior_strength <= 0 or token_prior_strength <= 0:
            raise ValueError("BayesianPopularity: prior strengths must be > 0")
        self.prior_strength = prior_strength
        self.token_prior_strength = token_prior_strength
        self.use_token_ids = use_token_ids
        self.exploration_initial = exploration_initial
        self.exploration_decay = exploration_decay
        self.slow_decay = slow_decay
        self.error_threshold = error_threshold
        self.error_smoothing = error_smoothing
        self.exploration = exploration
        self.layer_counts = np.zeros(shape.matrix_shape)  # [layers, experts] observed token-slots
        self.token_counts: dict[int, np.ndarray] = {}  # token id -> [layers, experts] token-slots
        self.layer_error = np.zeros(shape.layers)  # EMA of excess TV error per layer

    # -- the posterior ---------------------------------------------------------------------

    def layer_posterior(self) -> np.ndarray:
        """Posterior mean per layer, [layers, experts]: (alpha + n) / (E alpha + sum n)."""
        pseudo = self.layer_counts + self.prior_strength
        return pseudo / pseudo.sum(axis=1, keepdims=True)

    def token_posterior(self, token_ids: np.ndarray) -> np.ndarray:
        """P(e | v, l) for each token, [n, layers, experts], backing off to the layer posterior."""
        prior = self.layer_posterior()
        kappa = self.token_prior_strength
        rows = []
        for token in token_ids.tolist():
            counts = self.token_counts.get(int(token))
            if counts is None:
                rows.append(prior)
            else:
                rows.append((counts + kappa * prior) / (counts.sum(axis=1, keepdims=True) + kappa))
        return np.stack(rows) if rows else np.zeros((0, *self.shape.matrix_shape))

    def exploration_rates(self) -> np.ndarray:
        """eps per layer, [layers]: eps_0 (1 + rho'_l t) / (1 + rho t)."""
        t = self.observations
        slow = np.where(
            self.layer_error > 2 * self.error_threshold,
            self.slow_decay[0],
            np.where(self.layer_error > self.error_threshold, self.slow_decay[1], 0.0),
        )
        return np.clip(
            self.exploration_initial * (1 + slow * t) / (1 + self.exploration_decay * t), 0.0, 1.0
        )

    def exploration_distribution(self) -> np.ndarray:
        """Where exploration mass goes, [layers, experts]."""
        if self.exploration == "uniform":
            return np.full(self.shape.matrix_shape, 1.0 / self.shape.experts)
        return normalise_rows(1.0 / np.sqrt(1.0 + self.layer_counts))

    def posterior_mean(self, features: PromptFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(distribution [layers, experts] before exploration, concentration [layers])."""
        if self.use_token_ids and len(features.token_ids):
            per_token = self.token_posterior(features.token_ids)  # [n, layers, experts]
            evidence = np.array(
                [
                    self.token_counts[int(t)].sum(axis=1) if int(t) in self.token_counts else np.zeros(self.shape.layers)
                    for t in features.token_ids.tolist()
                ]
            )  # [n, layers]
            concentration = self.token_prior_strength + evidence.mean(axis=0)
            return per_token.mean(axis=0), concentration
        concentration = self.layer_counts.sum(axis=1) + self.shape.experts * self.prior_strength
        return self.layer_posterior(), concentration

    def forecast(self, features: PromptFeatures) -> Forecast:
        mean, concentration = self.posterior_mean(features)
        rates = self.exploration_rates()
        distribution = (1 - rates[:, None]) * mean + rates[:, None] * self.exploration_distribution()
        slots = max(expected_token_slots(features, self.shape.top_k), 1.0)
        spread = np.sqrt(distribution * (1 - distribution) * (1 / (concentration[:, None] + 1) + 1 / slots))
        expected_error = np.clip(0.5 * math.sqrt(2 / math.pi) * spread.sum(axis=1), 0.0, 1.0)
        confidence = (1.0 - float(expected_error.mean())) * (1.0 - float(rates.mean()))
        if self.observations == 0:
            confidence = 0.0
        return build_forecast(
            distribution,
            features,
            self.shape,
            confidence,
            self.name,
            extra={"exploration": rates.tolist()},
        )

    # -- learning --------------------------------------------------------------------------

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self._update(features, actual, token_routing=None)

    def observe_record(self, record: TraceRecord) -> None:
        self._update(record.features(), record.activation(), record.token_routing)

    def _update(self, features: PromptFeatures, actual: Activation, token_routing: np.ndarray | None) -> None:
        self.check_activation(actual)
        total = actual.total.astype(np.float64)
        if self.observations > 0 and total.sum() > 0:
            # Error beyond what sampling noise explains: TV(forecast, actual) - expected sampling TV.
            predicted = self.forecast(features).distribution
            slots = float(total.sum(axis=1).mean())
            excess = total_variation(predicted, normalise_rows(total)) - expected_sampling_total_variation(
                predicted, slots
            )
            self.layer_error += self.error_smoothing * (excess - self.layer_error)
        if self.use_token_ids and len(features.token_ids):
            if token_routing is not None:
                self._count_routed_tokens(features.token_ids, token_routing)
            else:
                self._attribute_prefill(features.token_ids, actual.prefill.astype(np.float64))
        self.layer_counts += total
        self.observations += 1

    def _count_routed_tokens(self, token_ids: np.ndarray, token_routing: np.ndarray) -> None:
        """Exact tables from per-token routing: token_routing [n, layers, top_k] expert ids."""
        layers, experts = self.shape.matrix_shape
        flat_offsets = (np.arange(layers) * experts)[:, None]  # [layers, 1]
        for token, chosen in zip(token_ids.tolist(), token_routing):
            counts = self.token_counts.setdefault(int(token), np.zeros((layers, experts)))
            np.add.at(counts.reshape(-1), (flat_offsets + chosen.astype(np.int64)).ravel(), 1.0)

    def _attribute_prefill(self, token_ids: np.ndarray, prefill: np.ndarray) -> None:
        """One EM step: split prefill [layers, experts] over tokens in proportion to P(e | v)."""
        per_token = self.token_posterior(token_ids)  # [n, layers, experts]
        responsibility = per_token / np.maximum(per_token.sum(axis=0, keepdims=True), 1e-12)
        attributed = responsibility * prefill[None]  # [n, layers, experts], sums to prefill
        for token, share in zip(token_ids.tolist(), attributed):
            counts = self.token_counts.setdefault(int(token), np.zeros(self.shape.matrix_shape))
            counts += share
