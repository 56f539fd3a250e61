"""capacity_drop: kept rows never exceed the capacity or the counts, nothing dropped when
the load fits, factor <= 0 keeps everything; a golden Switch-style case."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.capacity import capacity_drop, expert_capacity


def test_golden_switch_case():
    # 8 tokens x top-2 = 16 slots over 4 experts; factor 1.0 -> capacity ceil(16/4) = 4
    counts = np.array([9, 4, 2, 1])
    assert expert_capacity(16, 4, 1.0) == 4
    assert capacity_drop(counts, 1.0).tolist() == [4, 4, 2, 1]
    assert capacity_drop(counts, 1.25).tolist() == [5, 4, 2, 1]  # ceil(5.0)
    assert capacity_drop(counts, 2.0).tolist() == [8, 4, 2, 1]


def test_no_drop_when_off_or_balanced():
    counts = np.array([[9, 4, 2, 1], [4, 4, 4, 4]])
    assert capacity_drop(counts, 0.0).tolist() == counts.tolist()
    assert capacity_drop(counts, 1.0)[1].tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("seed", range(5))
def test_invariants(seed):
    rng = np.random.default_rng(seed)
    counts = rng.zipf(1.5, size=(6, 8)).clip(0, 500)
    for factor in (0.5, 1.0, 1.25, 2.0, 8.0):
        kept = capacity_drop(counts, factor)
        assert kept.shape == counts.shape and kept.dtype == np.int64
        assert np.all(kept >= 0) and np.all(kept <= counts)
        caps = np.ceil(factor * counts.sum(axis=1) / counts.shape[1] - 1e-9)
        assert np.all(kept <= caps[:, None])
        assert np.all((kept == counts) | (kept == caps[:, None]))  # dropped only above capacity
        if factor >= counts.shape[1]:
            assert np.array_equal(kept, counts)  # capacity >= every count
    larger = capacity_drop(counts, 2.0)
    assert np.all(larger >= capacity_drop(counts, 1.0))  # monotone in the factor


def test_bad_inputs():
    with pytest.raises(ValueError, match="counts"):
        capacity_drop(np.array([-1, 2]), 1.0)
    with pytest.raises(ValueError, match="whole"):
        capacity_drop(np.array([1.5, 2.0]), 1.0)
    with pytest.raises(ValueError, match="shape"):
        capacity_drop(np.zeros((2, 2, 2), dtype=int), 1.0)
    assert capacity_drop(np.array([0, 0]), 1.0).tolist() == [0, 0]
