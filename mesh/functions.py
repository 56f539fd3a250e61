"""The function registry: which expert functions exist, their instances and their lifecycle.

Shared by the coordinator's two threads: the asyncio control plane writes (spawn requested,
ready, stopped) and the engine thread reads (which warm instance serves this expert?) and
waits for cold starts. Every access holds one condition variable's lock.

Instance lifecycle (a str Enum and its allowed transitions, Ray Serve style):

    STARTING ──ready──► WARM ──stop/idle──► STOPPED
        │                 │
        └──spawn failed───┴──died / node lost──► FAILED
"""

from __future__ import annotations

import enum
import functools
import itertools
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from allocator.plan import Expert, FunctionSpec, Plan


class State(enum.StrEnum):
    STARTING = "starting"
    WARM = "warm"
    STOPPED = "stopped"
    FAILED = "failed"


ALLOWED = {
    State.STARTING: {State.WARM, State.STOPPED, State.FAILED},
    State.WARM: {State.STOPPED, State.FAILED},
    State.STOPPED: set(),
    State.FAILED: set(),
}


@dataclass
class Instance:
    instance_id: str
    function_id: str
    node: str
    replica: int
    memory_gb: float
    experts: frozenset = frozenset()  # what it loaded: a re-plan may reuse a function id for others
    state: State = State.STARTING
    endpoint: str = ""
    pid: int = 0
    requested_at: float = field(default_factory=time.time)
    suspect: int = 0  # consecutive failed calls

    @property
    def live(self) -> bool:
        return self.state in (State.STARTING, State.WARM)

    @functools.cached_property
    def version(self) -> Version:
        """Which function it serves: id, experts and memory (a re-plan may give an id other
        experts, or resize it: an instance of another size is not what the plan runs). Fixed
        when the instance is made; cached, as the data path compares it on every call."""
        return version_of(self.function_id, self.experts, self.memory_gb)


Version = tuple[str, frozenset, float]


def version_of(function_id: str, experts, memory_gb: float) -> Version:
    """A function as its instances are told apart: what the planner's estimate counts as warm
    (allocator.cost matches a warm instance by experts and memory) is what the mesh calls."""
    return function_id, frozenset(experts), round(float(memory_gb), 6)


class Registry:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.plan: Plan | None = None
        self.owner: dict[Expert, str] = {}  # expert -> function id (absent: local)
        self.functions: dict[str, FunctionSpec] = {}
        self._versions: dict[str, Version] = {}
        self.instances: dict[str, Instance] = {}
        self._ids = itertools.count()
        # Instance ids are unique across coordinator restarts: a re-registered daemon may still
        # run the last coordinator's "fn.0.0", which must not be mistaken for a new one.
        self.epoch = uuid.uuid4().hex[:4]
        self.generation = 0  # bumped on every change the engine thread must notice
        self._live: dict[str, list[Instance]] = {}  # function id -> its starting / warm instances
        # Written on every change: the engine thread's gather polls it beside the data sockets,
        # so a dying instance wakes a waiting round at once (no periodic health checks).
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK) if hasattr(os, "eventfd") else None

    # -- plan ------------------------------------------------------------------------------

    def set_plan(self, plan: Plan) -> None:
        with self.cond:
            self.plan = plan
            self.functions = {f.id: f for f in plan.functions}
            self._versions = {f.id: version_of(f.id, f.experts, f.memory_gb) for f in plan.functions}
            self.owner = {e: f.id for f in plan.functions for e in f.experts}
            self._changed()

    def owner_of(self, expert: Expert) -> str | None:
        return self.owner.get(expert)

    # -- lifecycle (control plane) ---------------------------------------------------------------

    def missing_replicas(self) -> list[tuple[FunctionSpec, int]]:
        """(function, replica index) pairs of the plan with no live instance."""
        with self.cond:
            out = []
            for spec in self.functions.values():
                live = {i.replica for i in self._of(spec) if i.live}
                out += [(spec, r) for r in range(spec.replicas) if r not in live]
            return out

    def new_instance(self, spec: FunctionSpec, replica: int, node: str) -> Instance:
        with self.cond:
            inst = Instance(f"{spec.id}.{replica}.{next(self._ids)}-{self.epoch}", spec.id, node, replica, spec.memory_gb,
                            frozenset(spec.experts))
            self.instances[inst.instance_id] = inst
            self._live.setdefault(spec.id, []).append(inst)
            self._changed()
            return inst

    def transition(self, instance_id: str, state: State, **fields) -> Instance | None:
        """Move an instance to `state`; returns None (and changes nothing) if not allowed."""
        with self.cond:
            inst = self.instances.get(instance_id)
            if inst is None or state not in ALLOWED[inst.state]:
                return None
            inst.state = state
            for key, value in fields.items():
                setattr(inst, key, value)
            if not inst.live:
                self._forget(inst)
            self._changed()
            return inst

    def fail_node(self, node: str) -> list[Instance]:
        with self.cond:
            lost = [i for i in self.instances.values() if i.node == node and i.live]
            for inst in lost:
                inst.state = State.FAILED
                self._forget(inst)
            self._changed()
            return lost

    def live_on(self, node: str) -> list[Instance]:
        """Instances starting or warm on `node`."""
        with self.cond:
            return [i for i in self.instances.values() if i.node == node and i.live]

    def load_on(self, node: str) -> float:
        with self.cond:
            return sum(i.memory_gb for i in self.instances.values() if i.node == node and i.live)

    def superseded_on(self, node: str) -> list[Instance]:
        """Live instances on `node` the plan no longer calls (a re-plan replaced their function, or
        dropped their replica), oldest first: what a placement may evict to make room."""
        with self.cond:
            wanted = {self.version(f.id): f.replicas for f in self.functions.values()}
            out = [i for i in self.instances.values() if i.node == node and i.live
                   and i.replica >= wanted.get(i.version, 0)]
            return sorted(out, key=lambda i: i.requested_at)

    def _of(self, spec: FunctionSpec) -> list[Instance]:
        """Live instances that serve exactly this function (same id, expert set and memory)."""
        wanted = self.version(spec.id)
        return [i for i in self._live.get(spec.id, ()) if i.version == wanted]

    def _forget(self, inst: Instance) -> None:
        live = self._live.get(inst.function_id, [])
        if inst in live:
            live.remove(inst)

    def warm_instances(self) -> list[Instance]:
        with self.cond:
            return [i for i in self.instances.values() if i.state is State.WARM]

    def live_instances(self) -> list[Instance]:
        """Warm and starting instances: what a re-plan can keep (a starting one's INIT is paid)."""
        with self.cond:
            return [i for i in self.instances.values() if i.live]

    def _changed(self) -> None:
        self.generation += 1
        self.cond.notify_all()
        if self.wake_fd is not None:
            os.eventfd_write(self.wake_fd, 1)

    def drain_wake(self) -> None:
        """Reset `wake_fd` (the engine thread, after it woke on it)."""
        try:
            os.eventfd_read(self.wake_fd)
        except (BlockingIOError, TypeError):
            pass

    # -- data plane (engine thread) --------------------------------------------------------------

    def version(self, function_id: str) -> Version:
        """The plan's function as its instances are told apart (Instance.version; cached at set_plan)."""
        cached = self._versions.get(function_id)
        return cached if cached is not None else version_of(function_id, (), 0.0)

    def serving(self, function_id: str) -> tuple[list[Instance], bool]:
        """(warm instances of the function, whether another is still starting)."""
        with self.cond:
            spec = self.functions.get(function_id)
            mine = self._of(spec) if spec is not None else []
            warm = sorted((i for i in mine if i.state is State.WARM), key=lambda i: (i.suspect, i.replica))
            return warm, any(i.state is State.STARTING for i in mine)

    def wait_warm(self, function_id: str, timeout: float) -> list[Instance]:
        """Block until the function has a warm instance, none is starting, or timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                warm, starting = self.serving(function_id)
                left = deadline - time.monotonic()
                if warm or not starting or left <= 0:
                    return warm
                self.cond.wait(left)

    def state_of(self, instance_id: str) -> State | None:
        inst = self.instances.get(instance_id)
        return inst.state if inst else None
