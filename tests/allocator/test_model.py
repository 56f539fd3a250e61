"""Inputs: the memory grid and the dataclasses' precondition checks."""

from __future__ import annotations

import numpy as np
import pytest

from allocator.model import (
    SLO,
    Cluster,
    MemoryGrid,
    ModelShape,
    Node,
    Prices,
    WarmInstance,
    Workload,
)


def test_grid_rounds_up_onto_minimum_plus_steps():
    grid = MemoryGrid(minimum_gb=0.125, step_gb=0.1, maximum_gb=10.0)
    assert grid.round_up(0.0) == 0.125
    assert grid.round_up(0.125) == 0.125
    assert grid.round_up(0.126) == 0.225
    assert grid.round_up(1.0) == 1.025
    assert grid.round_down(1.0) == 0.925
    assert grid.contains(1.025) and not grid.contains(1.0)
    points = grid.points(0.6)
    np.testing.assert_allclose(points, [0.125, 0.225, 0.325, 0.425, 0.525])
    assert all(grid.contains(p) for p in grid.points())


def test_grid_refuses_sizes_above_its_ceiling():
    grid = MemoryGrid(maximum_gb=2.0)
    with pytest.raises(ValueError, match="above the limit"):
        grid.round_up(2.5)
    assert grid.round_up(2.5, maximum_gb=4.0) == 2.525


@pytest.mark.parametrize(
    "build",
    [
        lambda: SLO(0.0, 0.1),
        lambda: Workload(0, 4),
        lambda: Prices(billing="monthly"),
        lambda: Node("n", "tpu", 1.0, 1),
        lambda: Cluster((Node("a", "cpu", 1.0, 1),), "b"),
        lambda: Cluster((Node("a", "cpu", 1.0, 1), Node("a", "cpu", 1.0, 1)), "a"),
        lambda: ModelShape(1, 4, 5, 8, 1, 0, 0, 16),
        lambda: WarmInstance("f", frozenset(), 1.0),
        lambda: MemoryGrid(minimum_gb=1.0, maximum_gb=0.5),
    ],
)
def test_preconditions_raise_clear_errors(build):
    with pytest.raises(ValueError):
        build()


def test_cluster_speed_cap_is_the_smallest_node_cpus():
    cluster = Cluster((Node("a", "cpu", 8.0, 2), Node("b", "cpu", 8.0, 4)), "a")
    assert cluster.speed_cap_gb(("a", "b")) == 2.0
    assert cluster.speed_cap_gb(()) == float("inf")
    assert cluster.main.name == "a"
