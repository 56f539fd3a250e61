"""Synthetic activation traces with prompt-dependent routing, for tests and benchmarks.

A toy "model" that routes like a real MoE, so every predictor has something real to learn:

- a vocabulary whose tokens belong to topics (plus generic tokens); a token's input embedding
  is ``common + topic_center + noise``, so prompts of one topic cluster in embedding space;
- per MoE layer a residual-like transform of the hidden state and a linear gate
  ``logits = gate[l] @ h`` ([experts, d]), top-k with Gumbel noise (routing noise);
- each token's hidden state mixes its own embedding with the prompt's mean (context), so
  routing depends on the token id *and* on the prompt's topic;
- some prompts mix two topics (harder to forecast), lengths vary (short prompts are noisier).

Every topic therefore has its own skewed expert distribution per layer, plus a global
popularity (from the ``common`` direction) that a moving average can learn.
Used by tests/predictor and by ``predictor.evaluate`` (``--synthetic`` and ``sps_scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from predictor.base import ModelShape
from predictor.traces import TraceMeta, TraceRecord


@dataclass(frozen=True)
class SyntheticConfig:
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    embedding_dim: int = 32
    topics: int = 6
    vocabulary: int = 512
    generic_fraction: float = 0.2  # share of the vocabulary belonging to no topic
    prompt_tokens: tuple[int, int] = (6, 48)  # inclusive range of prompt lengths
    new_tokens: tuple[int, int] = (0, 32)  # inclusive range of generated tokens
    topic_purity: float = 0.8  # share of a prompt's tokens drawn from its topics' vocabulary
    mix_probability: float = 0.25  # share of prompts mixing two topics
    token_noise: float = 0.6  # spread of token embeddings around their topic centre
    context_weight: float = 0.5  # share of the prompt mean in each token's hidden state
    router_scale: float = 2.5  # sharpness of the gate (higher: more skewed routing)
    routing_noise: float = 1.0  # Gumbel temperature on the gate logits
    popularity_scale: float = 0.5  # size of the shared direction that makes global favourites
    layer_drift: float = 0.3  # how much each layer's transform departs from the identity

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.layers, self.experts, self.top_k)


class SyntheticModel:
    """Generates :class:`TraceRecord` s from a seeded toy router (see module docstring)."""

    def __init__(self, config: SyntheticConfig | None = None, seed: int = 0) -> None:
        self.config = config or SyntheticConfig()
        cfg = self.config
        rng = np.random.default_rng(seed)
        d = cfg.embedding_dim
        generic = int(round(cfg.vocabulary * cfg.generic_fraction))
        topical = cfg.vocabulary - generic
        # token_topic[v] = topic of token v, or -1 for generic tokens
        self.token_topic = np.concatenate([np.arange(topical) % cfg.topics, -np.ones(generic, int)])
        self.topic_centers = rng.normal(size=(cfg.topics, d))  # [topics, d]
        common = rng.normal(size=d) * cfg.popularity_scale
        centers_of_tokens = np.where(
            self.token_topic[:, None] >= 0, self.topic_centers[np.maximum(self.token_topic, 0)], 0.0
        )
        self.token_embeddings = (  # [vocabulary, d]
            common + centers_of_tokens + cfg.token_noise * rng.normal(size=(cfg.vocabulary, d))
        ).astype(np.float32)
        identity = np.eye(d)
        self.layer_transforms = identity + cfg.layer_drift * rng.normal(size=(cfg.layers, d, d)) / np.sqrt(d)
        # gate_weights[l]: [experts, d], the router of MoE layer l (as in HF Mixtral's `gate`)
        self.gate_weights = rng.normal(size=(cfg.layers, cfg.experts, d)) * cfg.router_scale / np.sqrt(d)
        self.topic_tokens = [np.flatnonzero(self.token_topic == t) for t in range(cfg.topics)]
        self.generic_tokens = np.flatnonzero(self.token_topic < 0)
        self._rng = np.random.default_rng(seed + 1)

    @property
    def shape(self) -> ModelShape:
        return self.config.shape

    def meta(self, model_id: str = "synthetic") -> TraceMeta:
        cfg = self.config
        return TraceMeta(model_id, cfg.layers, cfg.experts, cfg.top_k, cfg.embedding_dim)

    def records(self, count: int, start: int = 0) -> list[TraceRecord]:
        """``count`` new records with ids ``req-{start}`` ..., continuing this model's stream."""
        return [self._record(f"req-{index}") for index in range(start, start + count)]

    # -- generation ------------------------------------------------------------------------

    def _draw_tokens(self, topics: list[int], count: int) -> np.ndarray:
        """``count`` token ids: from the given topics' vocabulary with probability
        ``topic_purity``, else generic tokens. Topical token v has topic ``v % topics``."""
        cfg, rng = self.config, self._rng
        topic_sizes = np.array([len(pool) for pool in self.topic_tokens])
        which_topic = rng.choice(np.asarray(topics), size=count)
        topical = which_topic + cfg.topics * rng.integers(0, topic_sizes[which_topic])
        generic = self.generic_tokens[rng.integers(0, len(self.generic_tokens), size=count)]
        from_topic = rng.random(count) < cfg.topic_purity
        return np.where(from_topic, topical, generic).astype(np.int64)

    def _route(self, token_ids: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Route tokens through every layer.

        Returns counts [L, E], chosen experts [n, L, top_k], mean gate input per layer [L, d].
        """
        cfg, rng = self.config, self._rng
        n = len(token_ids)
        hidden = (1 - cfg.context_weight) * self.token_embeddings[token_ids] + cfg.context_weight * context
        counts = np.zeros((cfg.layers, cfg.experts), dtype=np.int64)
        chosen = np.zeros((n, cfg.layers, cfg.top_k), dtype=np.int16)
        gate_inputs = np.zeros((cfg.layers, cfg.embedding_dim))
        for layer in range(cfg.layers):
            hidden = hidden @ self.layer_transforms[layer].T  # [n, d]
            gate_inputs[layer] = hidden.mean(axis=0) if n else 0.0
            logits = hidden @ self.gate_weights[layer].T  # [n, E]
            noisy = logits + cfg.routing_noise * rng.gumbel(size=logits.shape)
            top = np.argsort(-noisy, axis=1)[:, : cfg.top_k]  # [n, top_k]
            chosen[:, layer, :] = top
            np.add.at(counts[layer], top.ravel(), 1)
        return counts, chosen, gate_inputs

    def _record(self, request_id: str) -> TraceRecord:
        cfg, rng = self.config, self._rng
        topics = [int(rng.integers(cfg.topics))]
        if rng.random() < cfg.mix_probability:
            topics.append(int(rng.integers(cfg.topics)))
        n_prompt = int(rng.integers(cfg.prompt_tokens[0], cfg.prompt_tokens[1] + 1))
        n_new = int(rng.integers(cfg.new_tokens[0], cfg.new_tokens[1] + 1))
        token_ids = self._draw_tokens(topics, n_prompt)
        token_embeddings = self.token_embeddings[token_ids]  # [n, d]
        embedding = token_embeddings.mean(axis=0)  # [d]
        prefill, routing, gate_inputs = self._route(token_ids, embedding)
        if n_new:
            decode, _, _ = self._route(self._draw_tokens(topics, n_new), embedding)
        else:
            decode = np.zeros_like(prefill)
        text = f"topic {'+'.join(map(str, topics))}: " + " ".join(f"w{token}" for token in token_ids)
        return TraceRecord(
            request_id=request_id,
            prompt_text=text,
            token_ids=token_ids,
            embedding=embedding.astype(np.float32),
            prefill=prefill,
            decode=decode,
            new_tokens=n_new,
            token_embeddings=token_embeddings.astype(np.float32),
            gate_inputs=gate_inputs.astype(np.float32),
            token_routing=routing,
        )


def clustered_embeddings(
    count: int, dim: int, clusters: int = 32, spread: float = 0.5, seed: int = 0
) -> np.ndarray:
    """``count`` unit vectors [count, dim] around ``clusters`` random centres (for SPS scaling)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(clusters, size=count)
    vectors = centers[labels] + spread * rng.normal(size=(count, dim)) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
