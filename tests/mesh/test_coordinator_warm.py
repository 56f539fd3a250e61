"""Coordinator._warm as a unit: a function no live node can host is warned about once, not on
every reconcile tick (found by `moemesh bench --reliability`: a killed daemon on a full mesh
made the coordinator log 24 warnings every 0.25 s, ~4,000 lines before it came back)."""

from __future__ import annotations

import logging

from allocator.plan import FunctionSpec, MainSpec, Plan
from mesh.coordinator import Coordinator
from mesh.functions import Registry


class _Warmer:
    """What Coordinator._warm touches: a real Registry, a placement that can be switched on."""

    _warm = Coordinator._warm

    def __init__(self) -> None:
        self.registry = Registry()
        self.specs = [FunctionSpec(f"L0-E{e}", ((0, e),), 0.5) for e in range(3)]
        self.registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), tuple(self.specs)))
        self.spawn_failures: dict = {}
        self.unplaced: set = set()
        self.room = False
        self.spawned: list[str] = []

    def _place(self, spec, replica):
        return "n1" if self.room else None

    def _spawn(self, spec, replica, node):
        self.spawned.append(spec.id)
        self.registry.new_instance(spec, replica, node)


def test_an_unplaceable_function_is_warned_about_once_and_spawned_when_room_comes(caplog):
    warmer = _Warmer()
    with caplog.at_level(logging.INFO, logger="moemesh.coordinator"):
        for _ in range(20):  # 20 reconcile ticks with no room anywhere
            warmer._warm()
        warnings = [r for r in caplog.records if "no live node can host" in r.getMessage()]
        assert len(warnings) == 3 and not warmer.spawned
        warmer.room = True
        warmer._warm()
    assert sorted(warmer.spawned) == ["L0-E0", "L0-E1", "L0-E2"] and not warmer.unplaced
    assert sum("placed on n1 again" in r.getMessage() for r in caplog.records) == 3
