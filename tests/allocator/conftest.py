"""Shared fixtures: a small model (4 MoE layers x 8 experts, top-2), its synthetic profiles,
two clusters (GPU main + CPU nodes; one CPU host), and seeded random forecasts."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.model import SLO, Cluster, ModelShape, Node, Workload
from allocator.profiles import Profiles
from predictor.forecast import Forecast

HIDDEN, FFN = 512, 1408


def small_shape(layers: int = 4, experts: int = 8, top_k: int = 2) -> ModelShape:
    return ModelShape(
        moe_layers=layers,
        experts_per_layer=experts,
        top_k=top_k,
        hidden=HIDDEN,
        bytes_per_expert=3 * HIDDEN * FFN * 2,
        main_bytes=120 * 2**20,
        kv_bytes_per_token=2 * layers * HIDDEN * 2,
        activation_bytes=HIDDEN * 2,
        name=f"small-{layers}x{experts}",
    )


def random_forecast(
    rng: np.random.Generator, shape: ModelShape, workload: Workload, confidence: float | None = None
) -> Forecast:
    """Skewed rows (Dirichlet, concentration drawn per forecast), a few stragglers named."""
    concentration = rng.choice([0.2, 0.5, 1.0, 5.0])
    distribution = rng.dirichlet(
        np.full(shape.experts_per_layer, concentration), size=shape.moe_layers
    )
    load = distribution * workload.total_tokens * shape.top_k
    hottest = np.argmax(distribution, axis=1)
    stragglers = tuple((layer, int(e)) for layer, e in enumerate(hottest) if layer % 2 == 0)
    level = float(rng.uniform(0.2, 1.0)) if confidence is None else confidence
    return Forecast(distribution, load, level, stragglers, "test")


@pytest.fixture
def shape() -> ModelShape:
    return small_shape()


@pytest.fixture
def profiles(shape: ModelShape) -> Profiles:
    return Profiles.synthetic(shape)


@pytest.fixture
def workload() -> Workload:
    return Workload(prompt_tokens=64, new_tokens=16)


@pytest.fixture
def slo() -> SLO:
    return SLO(ttft_s=1.5, tpot_s=0.05)


@pytest.fixture
def gpu_cluster() -> Cluster:
    nodes = (
        Node("gpu0", "gpu", 40.0, 8),
        Node("cpu0", "cpu", 32.0, 8),
        Node("cpu1", "cpu", 32.0, 8),
    )
    return Cluster(nodes, "gpu0")


@pytest.fixture
def cpu_cluster() -> Cluster:
    return Cluster.single("local", "cpu", capacity_gb=64.0, cpus=16)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20251123)
