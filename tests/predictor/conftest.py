"""Shared fixtures: a small synthetic trace set and a tiny model shape."""

from __future__ import annotations

import pytest

from predictor.base import ModelShape
from predictor.synthetic import SyntheticConfig, SyntheticModel
from predictor.traces import split_records


@pytest.fixture(scope="session")
def synthetic_model() -> SyntheticModel:
    return SyntheticModel(SyntheticConfig(), seed=7)


@pytest.fixture(scope="session")
def synthetic_split(synthetic_model):
    """(train, test) records: ~480 / ~120 requests of the default synthetic config."""
    records = synthetic_model.records(600)
    return split_records(records, "id hash", test_fraction=0.2, seed=7)


@pytest.fixture
def small_shape() -> ModelShape:
    return ModelShape(layers=2, experts=4, top_k=1)
