"""Coordinator._warm as a unit: a function no live node can host is warned about once, not on
every reconcile tick (found by `moemesh bench --reliability`: a killed daemon on a full mesh
made the coordinator log 24 warnings every 0.25 s, ~4,000 lines before it came back)."""

from __future__ import annotations

import logging

from allocator.plan import FunctionSpec, MainSpec, Plan
from mesh.coordinator import Coordinator
from mesh.functions import Registry, State


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
        self.loading = None  # a re-plan loading its local experts (Coordinator.loading)
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


def test_while_a_re_plan_loads_its_experts_no_function_it_drops_is_started():
    """Coordinator._replan loads the new plan's local experts before the plan takes force; in
    that time the reconcile tick starts only the functions the new plan keeps, not the ones of
    the plan it replaces (whose cold starts would be billed for nothing), and once it is in
    force the rest of its own."""
    warmer = _Warmer()
    warmer.room = True
    kept = warmer.specs[0]
    warmer.loading = Plan("next", MainSpec(2.0), frozenset({(0, 1), (0, 2)}),
                          (kept, FunctionSpec("L0-E3", ((0, 3),), 0.5)))
    warmer._warm()
    assert warmer.spawned == ["L0-E0"]  # E1 and E2 go local; E3 is not in the plan in force yet
    warmer.registry.set_plan(warmer.loading)
    warmer.loading = None
    warmer._warm()
    assert warmer.spawned == ["L0-E0", "L0-E3"]


class _Placer:
    """What Coordinator._place touches: a real Registry, one live node, the stops it sends."""

    _place = Coordinator._place
    _make_room = Coordinator._make_room

    def __init__(self, capacity_gb: float) -> None:
        from mesh.coordinator import Node

        self.registry = Registry()
        self.nodes = {"n1": Node("n1", "cpu", "127.0.0.1", capacity_gb, 2, 0.0)}
        self.sent: list = []

    async def _to_node(self, name, msg):
        self.sent.append((name, msg))

    def plan(self, *specs: FunctionSpec) -> None:
        self.registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), specs))

    def warm(self, spec: FunctionSpec) -> str:
        inst = self.registry.new_instance(spec, 0, "n1")
        self.registry.transition(inst.instance_id, State.WARM)
        return inst.instance_id


async def test_a_placement_evicts_what_an_earlier_plan_left_warm_and_never_the_plans_own():
    import asyncio

    placer = _Placer(capacity_gb=2.0)
    a0, a1 = FunctionSpec("A0", ((0, 0),), 1.0), FunctionSpec("A1", ((0, 1),), 1.0)
    placer.plan(a0, a1)
    first, second = placer.warm(a0), placer.warm(a1)
    b0 = FunctionSpec("B0", ((0, 2),), 1.0)
    placer.plan(b0, a1)  # a re-plan: A0 is superseded, A1 stays
    assert [i.instance_id for i in placer.registry.superseded_on("n1")] == [first]
    assert placer._place(b0, 0) == "n1"
    await asyncio.sleep(0)  # the StopFunction task runs
    assert placer.registry.state_of(first) is State.STOPPED and placer.registry.state_of(second) is State.WARM
    assert [(n, m.instance_id) for n, m in placer.sent] == [("n1", first)]
    assert first in placer.nodes["n1"].ghosts  # listed by heartbeats until it exits: not taken for a ghost
    placer.warm(b0)
    c0 = FunctionSpec("C0", ((0, 3),), 1.0)
    placer.plan(b0, a1, c0)  # the node is full of the plan's own functions: no room, nothing stopped
    assert placer._place(c0, 0) is None and len(placer.sent) == 1


class _MainHoldingNothing:
    def holds(self, expert) -> bool:
        return False


def test_a_re_plan_that_gives_a_function_id_new_experts_waits_for_its_cold_start():
    """The executor loads a cold function's experts into the main function only when that very
    function (id and experts) was warm before, i.e. a replacement after a failure. A re-plan
    that reuses the id for other experts is a new function: its rows wait for the cold start
    (found in a Qwen-sized remoe run: 128 rows a run fell back, 27 on-demand loads of ~25 experts)."""
    from mesh.executor import MeshExecutor, ScatterSettings
    from mesh.meter import Meter, Prices

    registry = Registry()
    executor = MeshExecutor(registry, Meter(Prices(), {}), ScatterSettings(),
                            main=_MainHoldingNothing())
    first = FunctionSpec("L0-r0", ((0, 0), (0, 1)), 1.0)
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (first,)))
    inst = registry.new_instance(first, 0, "n1")
    registry.transition(inst.instance_id, State.WARM)
    assert executor._replicas("L0-r0", 0, [0, 1]) == ([registry.instances[inst.instance_id]], False)
    registry.transition(inst.instance_id, State.FAILED)
    replacement = registry.new_instance(first, 0, "n1")
    assert executor._replicas("L0-r0", 0, [0, 1]) == ([], False)  # the same function again: load, don't wait
    registry.transition(replacement.instance_id, State.STOPPED)
    second = FunctionSpec("L0-r0", ((0, 1), (0, 2)), 1.0)  # a re-plan: same id, other experts
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (second,)))
    registry.new_instance(second, 0, "n1")
    assert executor._replicas("L0-r0", 0, [1, 2]) == ([], True)  # a new function: wait for it


def test_a_re_plan_that_resizes_a_function_runs_the_new_size():
    """What the planner assumes is what runs: the estimator counts a warm instance only when its
    experts and memory match the plan's function, so the registry serves a resized function
    only from instances of the new size; the old size is superseded (evictable, then gone)."""
    registry = Registry()
    small = FunctionSpec("L0-r0", ((0, 0), (0, 1)), 0.5)
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (small,)))
    old = registry.new_instance(small, 0, "n1")
    registry.transition(old.instance_id, State.WARM)
    assert registry.serving("L0-r0") == ([old], False) and registry.missing_replicas() == []
    bigger = FunctionSpec("L0-r0", ((0, 0), (0, 1)), 0.75)  # the same experts, resized by a re-plan
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (bigger,)))
    assert registry.serving("L0-r0") == ([], False)
    assert registry.missing_replicas() == [(bigger, 0)]
    assert registry.superseded_on("n1") == [old]
    new = registry.new_instance(bigger, 0, "n1")
    registry.transition(new.instance_id, State.WARM)
    assert registry.serving("L0-r0") == ([new], False) and new.memory_gb == 0.75
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (small,)))  # and back: the old one serves
    assert registry.serving("L0-r0") == ([old], False) and registry.superseded_on("n1") == [new]


def test_a_re_plan_decides_with_the_instances_still_starting():
    """Registry.live_instances: what a re-plan can keep is warm and starting instances (a starting
    one's INIT is paid whichever plan wins); the estimate recorded for the meter takes the warm
    ones only (warm_instances), as the meter bills the rest's INIT to the request."""
    registry = Registry()
    spec = FunctionSpec("L0-r0", ((0, 0),), 1.0)
    registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (spec,)))
    starting = registry.new_instance(spec, 0, "n1")
    warm = registry.new_instance(spec, 1, "n2")
    gone = registry.new_instance(spec, 0, "n1")
    registry.transition(warm.instance_id, State.WARM)
    registry.transition(gone.instance_id, State.FAILED)
    assert {i.instance_id for i in registry.warm_instances()} == {warm.instance_id}
    assert {i.instance_id for i in registry.live_instances()} == {starting.instance_id, warm.instance_id}
