"""Remoe's Similar Prompts Searching (SPS): forecast a prompt's routing from similar past prompts.

Source: Remoe (arXiv 2512.18674), Sec. IV-B and Algorithm 1; PAPERS.md §1.4 A1-A4.

A1  Soft cosine similarity (SCS) of two prompts from their token-embedding matrices. With
    unit-norm rows, ``V1'CV2 = (sum of rows of E1) . (sum of rows of E2)``, so SCS is the cosine
    of the two summed unit-norm embeddings [D]: each prompt is reduced once to a unit
    "prompt vector" ([d]) and SCS is a dot product (:func:`prompt_vector`).
A2  A multi-fork clustering tree: a node holding more than ``leaf_size`` (beta = 150) prompts
    is split by k-medoids (distance 1 - SCS, roulette-wheel seeding, medoid = member maximising
    summed SCS to its cluster; fan-out k = 4 [D], at most 20 iterations [D]).
A3  Search: descend to the child whose medoid is most similar, brute-force the leaf, take the
    top ``alpha`` (15); a leaf with fewer than alpha prompts is topped up from its siblings.
A4  Forecast = softmax(SCS / temperature)-weighted sum of the neighbours' activation matrices
    (temperature 1.0 [D]).

Online use [D]: :meth:`SPSIndex.insert` descends to a leaf and appends; a leaf over beta is
re-clustered locally into up to k children. Insertion and search both cost
O(k * depth + beta) similarity evaluations, counted in ``similarity_evaluations``.
Because SCS is a dot product of unit vectors, a cluster's summed SCS to all members is
``member . sum(cluster)``, so a k-medoids iteration is O(n k d), not O(n^2 d).
Seeding: roulette wheel with probability proportional to dissimilarity (1 - SCS) to the medoids
already chosen (k-means++ style) [D]; PAPERS.md says "similarity-proportional", which would
seed medoids next to each other, so we read the paper's "roulette wheel sampling" this way.

Departure [D]: the paper stores prefill frequencies only; we store the request's whole
(prefill + decode) distribution by default, since ``Forecast.distribution`` covers both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from predictor.base import (
    ModelShape,
    Predictor,
    activation_distribution,
    build_forecast,
    normalise_rows,
    sampling_confidence,
)
from predictor.forecast import Activation, Forecast, PromptFeatures
from predictor.metrics import js_divergence

SIGMA = 1e-8  # Remoe's sigma: keeps SCS finite for all-zero embeddings


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows of [n, d] scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, SIGMA)


def prompt_vector(token_embeddings: np.ndarray) -> np.ndarray:
    """A prompt's unit vector [d] from its token embeddings [n, d]: sum of unit-norm rows, normalised.

    ``prompt_vector(E1) . prompt_vector(E2)`` equals :func:`soft_cosine_similarity` (up to sigma).
    A 1-D input is treated as a single row.
    """
    rows = np.atleast_2d(np.asarray(token_embeddings, dtype=np.float64))
    summed = _unit_rows(rows).sum(axis=0)
    return summed / max(float(np.linalg.norm(summed)), SIGMA)


def soft_cosine_similarity(first: np.ndarray, second: np.ndarray, sigma: float = SIGMA) -> float:
    """Remoe's eq. (11), computed literally with the Gram matrix (reference for tests).

    first: [n1, d], second: [n2, d] token embeddings. O((n1 + n2)^2 d).
    """
    stacked = np.vstack([_unit_rows(np.atleast_2d(first)), _unit_rows(np.atleast_2d(second))])
    gram = stacked @ stacked.T  # [n1 + n2, n1 + n2]
    n1 = np.atleast_2d(first).shape[0]
    owner_first = np.zeros(len(stacked))
    owner_first[:n1] = 1.0
    owner_second = 1.0 - owner_first
    cross = owner_first @ gram @ owner_second
    self_first = owner_first @ gram @ owner_first
    self_second = owner_second @ gram @ owner_second
    return float(cross / (math.sqrt(max(self_first, 0.0)) * math.sqrt(max(self_second, 0.0)) + sigma))


def k_medoids(
    vectors: np.ndarray, clusters: int, rng: np.random.Generator, max_iterations: int = 20
) -> tuple[np.ndarray, np.ndarray, int]:
    """k-medoids on unit vectors with similarity = dot product (distance 1 - SCS).

    vectors: [n, d] unit rows. Returns (labels [n] in 0..k'-1, medoid indices [k'], similarity
    evaluations used); k' <= clusters (duplicates can leave fewer distinct medoids).
    """
    n = len(vectors)
    evaluations = 0
    first = int(rng.integers(n))
    medoids = [first]
    best_similarity = vectors @ vectors[first]  # [n]
    evaluations += n
    while len(medoids) < min(clusters, n):
        weights = np.clip(1.0 - best_similarity, 0.0, None)
        weights[medoids] = 0.0
        total = weights.sum()
        if total <= 1e-12:
            break  # every remaining vector duplicates a medoid
        pick = int(rng.choice(n, p=weights / total))
        medoids.append(pick)
        best_similarity = np.maximum(best_similarity, vectors @ vectors[pick])
        evaluations += n
    medoid_indices = np.array(medoids)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(max_iterations):
        labels = np.argmax(vectors @ vectors[medoid_indices].T, axis=1)  # [n]
        evaluations += n * len(medoid_indices)
        updated = medoid_indices.copy()
        for cluster in range(len(medoid_indices)):
            members = np.flatnonzero(labels == cluster)
            if len(members) == 0:
                continue
            # summed SCS of each member to its cluster = member . sum(cluster): O(m d)
            scores = vectors[members] @ vectors[members].sum(axis=0)
            evaluations += len(members)
            updated[cluster] = members[int(np.argmax(scores))]
        if np.array_equal(updated, medoid_indices):
            break
        medoid_indices = updated
    labels = np.argmax(vectors @ vectors[medoid_indices].T, axis=1)
    evaluations += n * len(medoid_indices)
    used = np.unique(labels)
    remap = np.full(len(medoid_indices), -1)
    remap[used] = np.arange(len(used))
    return remap[labels], medoid_indices[used], evaluations


@dataclass(eq=False)
class _Node:
    """A tree node: a leaf holds vectors and ids; an internal node holds medoids and children."""

    vectors: np.ndarray | None = None  # leaf: [capacity, d], first `size` rows valid
    ids: list[int] = field(default_factory=list)  # leaf: payload ids of those rows
    medoids: np.ndarray | None = None  # internal: [children, d]
    children: list[_Node] = field(default_factory=list)
    split_at: int = 0  # leaf: do not try to split again before reaching this size

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def size(self) -> int:
        return len(self.ids)

    def valid_vectors(self) -> np.ndarray:
        assert self.vectors is not None
        return self.vectors[: self.size]


def _make_leaf(vectors: np.ndarray, ids: list[int]) -> _Node:
    capacity = max(8, 2 * len(ids))
    buffer = np.zeros((capacity, vectors.shape[1]))
    buffer[: len(ids)] = vectors
    return _Node(vectors=buffer, ids=list(ids))


class SPSIndex:
    """Remoe's clustering tree (A2/A3) over unit prompt vectors, with online insertion.

    ``insert(vector, payload_id)``; ``search(vector, alpha) -> [(payload_id, similarity)]``
    best first. ``similarity_evaluations`` counts every vector-vector dot product done.
    """

    def __init__(
        self, dim: int, fan_out: int = 4, leaf_size: int = 150, max_iterations: int = 20, seed: int = 0
    ) -> None:
        if fan_out < 2 or leaf_size < fan_out:
            raise ValueError(f"SPSIndex: need fan_out >= 2 and leaf_size >= fan_out, got {fan_out}, {leaf_size}")
        self.dim = dim
        self.fan_out = fan_out
        self.leaf_size = leaf_size
        self.max_iterations = max_iterations
        self.similarity_evaluations = 0
        self._rng = np.random.default_rng(seed)
        self._root = _make_leaf(np.zeros((0, dim)), [])
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: list[int],
        fan_out: int = 4,
        leaf_size: int = 150,
        max_iterations: int = 20,
        seed: int = 0,
    ) -> SPSIndex:
        """Offline bulk build (A2): recursive k-medoids splits of every node over ``leaf_size``.

        vectors: [n, d] (normalised here); ids: n payload ids.
        """
        unit = _unit_rows(np.asarray(vectors, dtype=np.float64))
        index = cls(unit.shape[1], fan_out, leaf_size, max_iterations, seed)
        index._root = index._build_node(unit, list(ids))
        index._count = len(ids)
        return index

    def insert(self, vector: np.ndarray, payload_id: int) -> None:
        """Descend to the most similar leaf, append, and split that leaf if it exceeds beta."""
        unit = prompt_vector(vector)
        leaf = self._descend(unit)[-1][0]
        assert leaf.vectors is not None
        if leaf.size == len(leaf.vectors):
            grown = np.zeros((2 * len(leaf.vectors), self.dim))
            grown[: leaf.size] = leaf.valid_vectors()
            leaf.vectors = grown
        leaf.vectors[leaf.size] = unit
        leaf.ids.append(payload_id)
        self._count += 1
        if leaf.size > self.leaf_size and leaf.size >= leaf.split_at:
            self._split_leaf(leaf)

    def search(self, vector: np.ndarray, alpha: int) -> list[tuple[int, float]]:
        """The ``alpha`` most similar stored prompts found by A3, best first: [(id, SCS)]."""
        if self._count == 0 or alpha <= 0:
            return []
        unit = prompt_vector(vector)
        path = self._descend(unit)
        leaf = path[-1][0]
        blocks = [leaf.valid_vectors()]
        ids = list(leaf.ids)
        # Top up from siblings, nearest subtrees first, climbing only when a level is exhausted.
        for parent, order in reversed(path[:-1]):
            if len(ids) >= alpha:
                break
            for child_position in order[1:]:
                for other_leaf in _leaves(parent.children[child_position]):
                    blocks.append(other_leaf.valid_vectors())
                    ids.extend(other_leaf.ids)
                if len(ids) >= alpha:
                    break
        candidates = np.vstack(blocks)
        similarities = candidates @ unit  # [candidates]
        self.similarity_evaluations += len(candidates)
        return _top(ids, similarities, alpha)

    def depth(self) -> int:
        """Levels from the root to the deepest leaf (1 for a single leaf)."""
        return _height(self._root)

    def leaf_sizes(self) -> list[int]:
        return [leaf.size for leaf in _leaves(self._root)]

    # -- internals -------------------------------------------------------------------------

    def _descend(self, unit: np.ndarray) -> list[tuple[_Node, np.ndarray]]:
        """[(node, children ordered by medoid similarity)] from the root down to a leaf."""
        path = []
        node = self._root
        while not node.is_leaf:
            assert node.medoids is not None
            similarities = node.medoids @ unit
            self.similarity_evaluations += len(similarities)
            order = np.argsort(-similarities, kind="stable")
            path.append((node, order))
            node = node.children[int(order[0])]
        path.append((node, np.zeros(0, dtype=np.int64)))
        return path

    def _split_leaf(self, leaf: _Node) -> None:
        vectors = leaf.valid_vectors()
        labels, medoid_indices, evaluations = k_medoids(
            vectors, self.fan_out, self._rng, self.max_iterations
        )
        self.similarity_evaluations += evaluations
        if len(medoid_indices) < 2:
            leaf.split_at = 2 * leaf.size  # near-duplicates: retry once the leaf has doubled
            return
        leaf.children = [
            _make_leaf(vectors[labels == cluster], [leaf.ids[i] for i in np.flatnonzero(labels == cluster)])
            for cluster in range(len(medoid_indices))
        ]
        leaf.medoids = vectors[medoid_indices].copy()
        leaf.vectors = None
        leaf.ids = []

    def _build_node(self, vectors: np.ndarray, ids: list[int]) -> _Node:
        if len(ids) <= self.leaf_size:
            return _make_leaf(vectors, ids)
        labels, medoid_indices, evaluations = k_medoids(
            vectors, self.fan_out, self._rng, self.max_iterations
        )
        self.similarity_evaluations += evaluations
        if len(medoid_indices) < 2:
            leaf = _make_leaf(vectors, ids)
            leaf.split_at = 2 * len(ids)
            return leaf
        children = []
        for cluster in range(len(medoid_indices)):
            members = np.flatnonzero(labels == cluster)
            children.append(self._build_node(vectors[members], [ids[i] for i in members]))
        return _Node(medoids=vectors[medoid_indices].copy(), children=children)


def _leaves(node: _Node):
    stack = [node]
    while stack:
        current = stack.pop()
        if current.is_leaf:
            yield current
        else:
            stack.extend(reversed(current.children))


def _height(node: _Node) -> int:
    return 1 if node.is_leaf else 1 + max(_height(child) for child in node.children)


def _top(ids: list[int], similarities: np.ndarray, alpha: int) -> list[tuple[int, float]]:
    if len(ids) > alpha:
        chosen = np.argpartition(-similarities, alpha - 1)[:alpha]
    else:
        chosen = np.arange(len(ids))
    chosen = chosen[np.argsort(-similarities[chosen], kind="stable")]
    return [(ids[int(i)], float(similarities[i])) for i in chosen]


class BruteForceIndex:
    """The exhaustive reference (Remoe's BF baseline): same API as :class:`SPSIndex`."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.similarity_evaluations = 0
        self._vectors = np.zeros((64, dim))
        self._ids: list[int] = []

    def __len__(self) -> int:
        return len(self._ids)

    def insert(self, vector: np.ndarray, payload_id: int) -> None:
        if len(self._ids) == len(self._vectors):
            self._vectors = np.vstack([self._vectors, np.zeros_like(self._vectors)])
        self._vectors[len(self._ids)] = prompt_vector(vector)
        self._ids.append(payload_id)

    def search(self, vector: np.ndarray, alpha: int) -> list[tuple[int, float]]:
        if not self._ids or alpha <= 0:
            return []
        similarities = self._vectors[: len(self._ids)] @ prompt_vector(vector)
        self.similarity_evaluations += len(self._ids)
        return _top(self._ids, similarities, alpha)


class SPSPredictor(Predictor):
    """Remoe's SPS as a predictor (A1-A4) over an online :class:`SPSIndex`.

    index: ``"tree"`` (SPS) or ``"brute"`` (Remoe's BF baseline, name ``sps-brute``).
    Confidence = clip(weighted mean neighbour SCS, 0, 1) x neighbour agreement
    (1 - weighted mean JS(neighbour, forecast) / ln 2) x sampling confidence of the request size.
    """

    name = "sps"

    def __init__(
        self,
        shape: ModelShape,
        seed: int = 0,
        alpha: int = 15,
        leaf_size: int = 150,
        fan_out: int = 4,
        temperature: float = 1.0,
        index: str = "tree",
    ) -> None:
        super().__init__(shape, seed)
        if index not in ("tree", "brute"):
            raise ValueError(f"SPSPredictor: index must be 'tree' or 'brute', got {index!r}")
        if temperature <= 0:
            raise ValueError("SPSPredictor: temperature must be > 0")
        self.alpha = alpha
        self.leaf_size = leaf_size
        self.fan_out = fan_out
        self.temperature = temperature
        self.index_kind = index
        if index == "brute":
            self.name = "sps-brute"
        self.index: SPSIndex | BruteForceIndex | None = None
        # stored activation distributions, [capacity, layers, experts], first `observations` valid
        self._distributions = np.zeros((64, *shape.matrix_shape), dtype=np.float32)

    def _make_index(self, dim: int) -> SPSIndex | BruteForceIndex:
        if self.index_kind == "brute":
            return BruteForceIndex(dim)
        return SPSIndex(dim, self.fan_out, self.leaf_size, seed=self.seed)

    def observe(self, features: PromptFeatures, actual: Activation) -> None:
        self.check_activation(actual)
        vector = prompt_vector(features.token_embeddings)
        if self.index is None:
            self.index = self._make_index(len(vector))
        if self.observations == len(self._distributions):
            self._distributions = np.concatenate([self._distributions, np.zeros_like(self._distributions)])
        self._distributions[self.observations] = activation_distribution(actual)
        self.index.insert(vector, self.observations)
        self.observations += 1

    def neighbours(self, features: PromptFeatures) -> list[tuple[int, float]]:
        """The alpha most similar stored prompts: [(stored index, SCS)], best first."""
        if self.index is None:
            return []
        return self.index.search(prompt_vector(features.token_embeddings), self.alpha)

    def forecast(self, features: PromptFeatures) -> Forecast:
        found = self.neighbours(features)
        if not found:
            return build_forecast(
                np.ones(self.shape.matrix_shape), features, self.shape, 0.0, self.name
            )
        indices = np.array([index for index, _ in found])
        similarities = np.array([similarity for _, similarity in found])
        logits = similarities / self.temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        stored = self._distributions[indices].astype(np.float64)  # [alpha, layers, experts]
        distribution = normalise_rows(np.einsum("a,ale->le", weights, stored))
        disagreement = float(weights @ js_divergence(stored, distribution[None]).mean(axis=1)) / math.log(2)
        closeness = float(np.clip(weights @ similarities, 0.0, 1.0))
        slots = (len(features.token_ids) + max(features.expected_new_tokens, 0)) * self.shape.top_k
        confidence = closeness * (1.0 - min(disagreement, 1.0)) * sampling_confidence(distribution, slots)
        return build_forecast(
            distribution,
            features,
            self.shape,
            confidence,
            self.name,
            extra={"neighbours": len(found), "mean_similarity": closeness},
        )
