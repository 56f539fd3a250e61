"""The main function's routed experts: what the coordinator holds, loads, drops and bills.

DESIGN.md's first rule is memory held = memory billed. The coordinator's model holds the
non-expert weights (embeddings, attention, norms, gates, shared experts) and only the routed
experts its plan keeps local:

    plan P0 ──► load(P0.local)                        (start-up, before serving)
    plan P1 ──► load(P1.local - held)   pinned = P1.local       (planning thread, additive)
          └──► registry.set_plan(P1)
    step boundary (engine thread) ──► reconcile(): drop held experts that are neither pinned
                                     nor without a warm function to serve them
    a call fails, no replica left ──► load([expert]) on the critical path: a billed cold start

Every change of what is held reports the new byte count through `on_change`, and the
coordinator bills the main function at the size those bytes need (planning.main_billed_gb).
An expert that a re-plan moved to a function stays held (and billed) until that function has a
warm instance, so no round waits for a cold start that the main function could cover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from allocator.plan import Expert
from nodes.model.checkpoint import Checkpoint
from nodes.model.model import MoEModel

log = logging.getLogger("moemesh.main")


class MainExperts:
    def __init__(self, model: MoEModel, checkpoint: Checkpoint,
                 on_change: Callable[[int, int], None] = lambda held_bytes, experts: None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.blocks = model.moe_blocks()
        self.on_change = on_change  # (held bytes, held routed experts) after every load or drop
        self.lock = threading.Lock()  # one reader of the checkpoint, one mutation at a time
        self.pinned: frozenset[Expert] = frozenset(model.held_experts())  # the plan's local experts
        self.on_demand: set[Expert] = set()
        self.loaded = self.dropped = 0

    def holds(self, expert: Expert) -> bool:
        layer, e = expert
        return e in self.blocks[layer].experts

    def held(self) -> set[Expert]:
        return self.model.held_experts()

    def held_bytes(self) -> int:
        return self.model.held_bytes()

    def _device(self):
        return next(self.model.parameters()).device

    def load(self, experts: Iterable[Expert], *, pin: bool = False, on_demand: bool = False) -> tuple[list[Expert], float]:
        """Hold these experts (reading only the missing ones); returns (loaded, seconds).

        pin: they are the plan's local experts (replaces the pinned set; reconcile keeps them).
        on_demand: loaded on a request's critical path (a failed call, a missing local expert).
        """
        experts = list(dict.fromkeys(tuple(e) for e in experts))
        with self.lock:
            if pin:
                self.pinned = frozenset(experts)
            missing = [e for e in experts if not self.holds(e)]
            if not missing:
                return [], 0.0
            start = time.perf_counter()
            device = self._device()
            for (layer, e), mlp in self.checkpoint.load_experts(missing).items():
                self.blocks[layer].experts.add(e, mlp.to(device))
            seconds = time.perf_counter() - start
            self.loaded += len(missing)
            if on_demand:
                self.on_demand.update(missing)
            held_bytes, count = self.held_bytes(), len(self.held())
        self.on_change(held_bytes, count)
        log.log(logging.WARNING if on_demand else logging.INFO,
                "main function loaded %d experts in %.3f s%s (now %d held, %.1f MB)", len(missing), seconds,
                " on demand" if on_demand else "", count, held_bytes / 1e6)
        return missing, seconds

    def drop(self, experts: Iterable[Expert]) -> list[Expert]:
        with self.lock:
            gone = [tuple(e) for e in experts if self.holds(tuple(e)) and tuple(e) not in self.pinned]
            if not gone:
                return []
            for layer, e in gone:
                self.blocks[layer].experts.drop(e)
                self.on_demand.discard((layer, e))
            self.dropped += len(gone)
            held_bytes, count = self.held_bytes(), len(self.held())
        self.on_change(held_bytes, count)
        log.info("main function dropped %d experts a warm function serves (now %d held, %.1f MB)",
                 len(gone), count, held_bytes / 1e6)
        return gone

    def reconcile(self, served_warm: Callable[[Expert], bool]) -> list[Expert]:
        """Drop held experts that are not pinned and that a warm function serves (engine thread,
        between steps: no round is using them)."""
        with self.lock:
            candidates = [e for e in self.held() if e not in self.pinned]
        return self.drop([e for e in candidates if served_warm(e)]) if candidates else []
