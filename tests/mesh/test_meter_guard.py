"""The meter guard: once the `moemesh` policy has cost more on the meter than all-local would have
for the same traffic, it plans all-local, decided at the next admission (mesh/coordinator.py)."""

from __future__ import annotations

from types import SimpleNamespace

from mesh.config import load_config
from mesh.coordinator import Coordinator


class FakeMeter:
    def __init__(self, cost: float, baseline: float, finished: int) -> None:
        self.cost, self.baseline, self.finished = cost, baseline, [object()] * finished

    def billing(self) -> dict:
        return {"cost": self.cost, "baseline_all_local_cost": self.baseline}


def coordinator(policy="moemesh", guard=True, **meter):
    config = load_config(None, {"policy.name": policy, "policy.meter_guard": guard})
    c = SimpleNamespace(config=config, meter=FakeMeter(**meter), guard_tripped=False)
    c._guard_trips = lambda: Coordinator._guard_trips(c)  # the coordinator's methods on a stand-in
    return c


def trips(c) -> bool:
    return c._guard_trips()


def test_the_guard_trips_once_when_the_meter_says_all_local_was_cheaper():
    c = coordinator(cost=2.0, baseline=1.0, finished=2)
    assert trips(c) and c.guard_tripped
    assert not trips(c)  # once: the re-plan it forces happens one time
    assert Coordinator._guarded_config(c).policy.name == "all-local"


def test_the_guard_waits_for_two_requests_and_a_dearer_meter():
    assert not trips(coordinator(cost=2.0, baseline=1.0, finished=1))
    assert not trips(coordinator(cost=1.0, baseline=1.0, finished=5))
    cheap = coordinator(cost=0.5, baseline=1.0, finished=5)
    assert Coordinator._guarded_config(cheap).policy.name == "moemesh"


def test_only_moemesh_with_the_guard_on_is_guarded():
    assert not trips(coordinator(policy="remoe", cost=2.0, baseline=1.0, finished=3))
    assert not trips(coordinator(guard=False, cost=2.0, baseline=1.0, finished=3))
