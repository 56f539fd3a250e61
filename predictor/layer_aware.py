"""MoEless-style layer-aware load predictor: per-layer linear heads on hidden states.

Source: MoEless (arXiv 2603.06350; abstract only, PAPERS.md §3.2 is our reconstruction [D]),
in the spirit of Pre-gated MoE and Fate (a layer's routing predicted from an earlier layer's
hidden state). For MoE layer l a linear head ``W_l`` ([d, E] plus a bias) maps a mean hidden
state to routing logits; ``softmax`` of them is the layer's predicted load distribution.

- Heads are initialised from the model's gate of layer l (``gate_weights[l]``, [E, d], as in
  HF Mixtral's ``gate``) when given, and fitted online by closed-form ridge regression toward
  that prior: ``W = (X'X + lambda I)^-1 (X'Z + lambda W_0)`` on running sums X'X, X'Z, with
  targets Z the centred log of the observed (smoothed) shares, so softmax(W'x) fits the shares.
  lambda = ``ridge`` x the mean squared feature, so it is scale-free and data overrule the prior.
- Two banks of heads [D]: *prompt heads* read the prompt embedding (``PromptFeatures.embedding``,
  known at admission) and serve :meth:`forecast`; *next-layer heads* read the mean gate input
  of layer l-1 (``TraceRecord.gate_inputs``; the embedding for layer 0) and serve
  :meth:`predict_next_layer`, which the runtime calls during layer l-1.
- Inputs wider than ``max_features`` go through a fixed seeded orthonormal projection
  ([max_features, d]); the gate prior is projected with it (``W_0 = P G'``).
- Blend with recent history: ``w_l head + (1 - w_l) EMA_l`` with w_l = EMA error of history /
  (sum of both EMA errors), errors measured on each request before learning from it (each
  bank of heads keeps its own error, so each has its own blend).
- Stragglers: experts whose predicted load exceeds ``theta`` (1.5) x the layer mean.
Confidence: mean over layers of ``(1 - blended EMA error_l) / (1 + leverage_l)``, with
leverage ``x'(X'X + lambda I)^-1 x`` of the prompt (high for prompts unlike the training data),
times sampling confidence of the request size.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from predictor.base import (
    DEFAULT_STRAGGLER_THRESHOLD,
    ModelShape,
    Predictor,
    activation_distribution,
    build_forecast,
    expected_token_slots,
    sampling_confidence,
    total_variation,
)
from predictor.forecast import Activation, Forecast, PromptFeatures
from predictor.traces import TraceRecord

SHARE_PSEUDO_COUNT = 0.5  # added to each expert's slots before taking logs of shares


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class LinearLoadHead:
    """Ridge regression of one layer's routing logits on a feature vector.

    input [input_dim] -> logits [experts] -> distribution softmax(logits).
    weights: [input_dim + 1, experts] (last row: bias). prior_weights: [input_dim, experts].
    """

    def __init__(
        self, input_dim: int, experts: int, ridge: float = 1e-2, prior_weights: np.ndarray | None = None
    ) -> None:
        self.input_dim = input_dim
        self.experts = experts
        self.ridge = ridge
        self.samples = 0
        self.gram = np.zeros((input_dim + 1, input_dim + 1))  # X'X (with bias column)
        self.cross = np.zeros((input_dim + 1, experts))  # X'Z
        self.prior = np.zeros((input_dim + 1, experts))
        if prior_weights is not None:
            if prior_weights.shape != (input_dim, experts):
                raise ValueError(f"LinearLoadHead: prior {prior_weights.shape}, expected {(input_dim, experts)}")
            self.prior[:input_dim] = prior_weights - prior_weights.mean(axis=1, keepdims=True)
        self._weights: np.ndarray | None = self.prior.copy()
        self._factor = None

    @staticmethod
    def _with_bias(x: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(x, dtype=np.float64), 1.0)

    def update(self, x: np.ndarray, target_distribution: np.ndarray) -> None:
        """Add one sample: x [input_dim], target_distribution [experts] (strictly positive)."""
        log_share = np.log(np.clip(target_distribution, 1e-12, None))
        target_logits = log_share - log_share.mean()
        features = self._with_bias(x)
        self.gram += np.outer(features, features)
        self.cross += np.outer(features, target_logits)
        self.samples += 1
        self._weights = None

    def _penalty(self) -> float:
        if self.samples == 0:
            return self.ridge
        mean_square = np.trace(self.gram) / (self.samples * (self.input_dim + 1))
        return self.ridge * max(float(mean_square), 1e-12)

    def _solve(self) -> None:
        penalty = self._penalty()
        system = self.gram + penalty * np.eye(self.input_dim + 1)
        self._factor = scipy.linalg.cho_factor(system)
        self._weights = scipy.linalg.cho_solve(self._factor, self.cross + penalty * self.prior)

    @property
    def weights(self) -> np.ndarray:
        """[input_dim + 1, experts]: the fitted map (last row: bias)."""
        if self._weights is None:
            self._solve()
        assert self._weights is not None
        return self._weights

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        return self._with_bias(x) @ self.weights

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted load distribution [experts]."""
        return _softmax(self.predict_logits(x))

    def leverage(self, x: np.ndarray) -> float:
        """``x'(X'X + lambda I)^-1 x``: large for inputs unlike the training data."""
        if self._factor is None or self._weights is None:
            self._solve()
        features = self._with_bias(x)
        return float(features @ scipy.linalg.cho_solve(self._factor, features))


class LayerAwarePredictor(Predictor):
    """Per-layer linear heads on hidden states, blended with an EMA of history (module docstring).

    gate_weights: optional [layers, experts, d], the model's router weights.
    """

    name = "layer-aware"

    def __init__(
        self,
        shape: ModelShape,
        seed: int = 0,
        gate_weights: np.ndarray | None = None,
        ridge: float = 1e-2,
        history_smoothing: float = 0.1,
        error_smoothing: float = 0.1,
        max_features: int = 64,
        straggler_threshold: float = DEFAULT_STRAGGLER_THRESHOLD,
    ) -> None:
        super().__init__(shape, seed)
        if gate_weights is not None and gate_weights.shape[:2] != shape.matrix_shape:
            raise ValueError(
                f"LayerAwarePredictor: gate_weights {gate_weights.shape}, expected [{shape.layers}, {shape.experts}, d]"
            )
        self.gate_weights = gate_weights
        self.ridge = ridge
        self.history_smoothing = history_smoothing
        self.error_smoothing = error_smoothing
        self.max_features = max_features
        self.straggler_threshold = straggler_threshold
        self.history = np.full(shape.matrix_shape, 1.0 / shape.experts)  # EMA [layers, experts]
        self.head_error = np.ones(shape.layers)  # EMA of TV error of the prompt heads
        self.history_error = np.ones(shape.layers)  # EMA of TV error of the history
        self.blend_error = np.ones(shape.layers)  # EMA of TV error of the blended forecast
        self.next_layer_error = np.ones(shape.layers)  # EMA of TV error of the next-layer heads
        self.projection: np.ndarray | None = None  # [features, d] or None for identity
        self.prompt_heads: list[LinearLoadHead] = []
        self.next_layer_heads: list[LinearLoadHead] = []
        if gate_weights is not None:
            self._make_heads(gate_weights.shape[2])

    # -- set-up ----------------------------------------------------------------------------

    def _make_heads(self, dim: int) -> None:
        if dim > self.max_features:
            rng = np.random.default_rng(self.seed)
            orthonormal, _ = np.linalg.qr(rng.normal(size=(dim, self.max_features)))
            self.projection = orthonormal.T  # [features, d], orthonormal rows
        features = self.max_features if self.projection is not None else dim
        priors: list[np.ndarray | None] = [None] * self.shape.layers
        if self.gate_weights is not None:
            for layer in range(self.shape.layers):
                gate = self.gate_weights[layer]  # [E, d]
                priors[layer] = gate.T if self.projection is None else self.projection @ gate.T
        self.prompt_heads = [
            LinearLoadHead(features, self.shape.experts, self.ridge, priors[layer])
            for layer in range(self.shape.layers)
        ]
        self.next_layer_heads = [
            LinearLoadHead(features, self.shape.experts, self.ridge, priors[layer])
            for layer in range(self.shape.layers)
        ]

    def _project(self, hidden: np.ndarray) -> np.ndarray:
        hidden = np.asarray(hidden, dtype=np.float64)
        if not self.prompt_heads:
            self._make_heads(len(hidden))
        return hidden if self.projection is None else self.projection @ hidden

    def _head_weight(self, head_error: np.ndarray | None = None) -> np.ndarray:
        """Share of the head in the blend per layer, [layers] (prompt heads by default)."""
        if self.observations == 0 and self.gate_weights is None:
            return np.zeros(self.shape.layers)
        head_error = self.head_error if head_error is None else head_error
        return self.history_error / np.maximum(head_error + self.history_error, 1e-12)

    # -- forecasting -----------------------------------------------------------------------

    def _prompt_forecast(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(blended [layers, experts], head-only [layers, experts], leverage [layers])."""
        x = self._project(embedding)
        heads = np.stack([head.predict(x) for head in self.prompt_heads])
        leverage = np.array([head.leverage(x) for head in self.prompt_heads])
        weight = self._head_weight()[:, None]
        return weight * heads + (1 - weight) * self.history, heads, leverage

    def forecast(self, features: PromptFeatures) -> Forecast:
        distribution, _, leverage = self._prompt_forecast(features.embedding)
        if self.observations == 0 and self.gate_weights is None:
            confidence = 0.0
        else:
            per_layer = (1.0 - self.blend_error) / (1.0 + leverage)
            confidence = float(per_layer.mean()) * sampling_confidence(
                distribution, expected_token_slots(features, self.shape.top_k)
            )
        return build_forecast(
            distribution,
            features,
            self.shape,
            confidence,
            self.name,
            self.straggler_threshold,
            extra={"head_weight": self._head_weight().tolist()},
        )

    def predict_next_layer(self, layer: int, hidden_mean: np.ndarray, tokens: int = 1) -> np.ndarray:
        """Expected token-slots per expert of MoE layer ``layer``, [experts], from the mean hidden
        state entering layer ``layer - 1`` (the prompt embedding for layer 0), for ``tokens``
        tokens (``tokens * top_k`` slots in all). Runs during layer ``layer - 1``."""
        if not 0 <= layer < self.shape.layers:
            raise ValueError(f"predict_next_layer: layer {layer} outside [0, {self.shape.layers})")
        x = self._project(hidden_mean)
        weight = self._head_weight(self.next_layer_error)[layer]
        head = self.next_layer_heads[layer].predict(x)
        distribution = weight * head + (1 - weight) * self.history[layer]
        return distribution * tokens * self.shape.top_k

    # -- learning --------------------------------------------------------------------------

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self._update(features, actual, gate_inputs=None)

    def observe_record(self, record: TraceRecord) -> None:
        self._update(record.features(), record.activation(), record.gate_inputs)

    def _update(self, features: PromptFeatures, actual: Activation, gate_inputs: np.ndarray | None) -> None:
        self.check_activation(actual)
        truth = activation_distribution(actual)
        x = self._project(features.embedding)
        # Prequential errors: judge each part on this request before learning from it.
        blended, heads, _ = self._prompt_forecast(features.embedding)
        rate = max(self.error_smoothing, 1.0 / (self.observations + 1))
        self.head_error += rate * (total_variation(heads, truth) - self.head_error)
        self.history_error += rate * (total_variation(self.history, truth) - self.history_error)
        self.blend_error += rate * (total_variation(blended, truth) - self.blend_error)
        previous_layer_inputs = [
            x if layer == 0 or gate_inputs is None else self._project(gate_inputs[layer - 1])
            for layer in range(self.shape.layers)
        ]
        next_layer = np.stack(
            [head.predict(inputs) for head, inputs in zip(self.next_layer_heads, previous_layer_inputs)]
        )
        self.next_layer_error += rate * (total_variation(next_layer, truth) - self.next_layer_error)
        # Targets: smoothed shares (never zero, so their logs are finite).
        total = actual.total.astype(np.float64) + SHARE_PSEUDO_COUNT
        shares = total / total.sum(axis=1, keepdims=True)
        for layer in range(self.shape.layers):
            self.prompt_heads[layer].update(x, shares[layer])
            self.next_layer_heads[layer].update(previous_layer_inputs[layer], shares[layer])
        self.observations += 1
        history_rate = max(self.history_smoothing, 1.0 / self.observations)
        self.history += history_rate * (truth - self.history)
