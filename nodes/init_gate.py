"""How many cold starts a node runs at once: while their CPU shares fit its vCPUs; the rest
wait their turn, first come, first served.

A cold start's INIT (cgroup join, weight load, socket bind) is CPU work, and it is billed by
the second (mesh/meter.py). Measured on this machine, 48 one-expert functions of 0.25-0.33 GB
requested at once on two 1-vCPU nodes, all forked at once: the INITs shared the cores, each
took 0.3-0.7 s on average (0.035 s alone at a full vCPU), the burst billed 15-30 s of INIT,
varying 2x from one burst to the next with how forks and INITs happened to interleave, and the
last one was ready after 1.1-2.0 s. One at a time per node, INIT fell to 0.06-0.13 s, but each
ran at its own CPU quota (the worker joins its cgroup first), a quarter of a vCPU left the rest
of the core idle, and the last was ready after 2.5-4.4 s. So a node admits cold starts into
fork + INIT while the CPU shares of those in it (each at most 1: INIT is one thread) fit its
vCPUs: every INIT runs at about its quota, the cores stay busy, and the billed INIT is about
the INIT alone at that share. A spawn waits here before its fork; that wait is the platform's,
not the function's: it lands in the "spawn" stage, which is not billed (a serverless platform
does not bill the queue in front of a sandbox). The estimator models the same gate
(allocator/coldstart.py, ``Node.init_cpus``).
"""

from __future__ import annotations

import asyncio
from collections import deque


class InitGate:
    """``await enter(key, need)`` until ``need`` fits in ``capacity`` beside the holders, in
    arrival order (one at a time always fits: a need above the capacity waits for an empty
    gate); ``leave(key)`` gives its share back (idempotent)."""

    def __init__(self, capacity: float) -> None:
        if capacity <= 0:
            raise ValueError(f"InitGate: capacity must be > 0 vCPUs, got {capacity}")
        self.capacity = float(capacity)
        self.holders: dict[str, float] = {}
        self.queue: deque[tuple[str, float, asyncio.Future]] = deque()

    def _fits(self, need: float) -> bool:
        return not self.holders or sum(self.holders.values()) + need <= self.capacity + 1e-9

    async def enter(self, key: str, need: float) -> None:
        if not self.queue and self._fits(need):
            self.holders[key] = need
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (key, need, turn)
        self.queue.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a share just as it was cancelled
                self.leave(key)
            else:
                self.queue.remove(entry)
                self._admit()  # it may have blocked the head of the queue
            raise

    def leave(self, key: str) -> None:
        if self.holders.pop(key, None) is not None:
            self._admit()

    def _admit(self) -> None:
        while self.queue and self._fits(self.queue[0][1]):
            key, need, turn = self.queue.popleft()
            if not turn.done():
                self.holders[key] = need
                turn.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self.queue)
