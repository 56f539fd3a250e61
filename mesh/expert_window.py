"""A cheap windowed read of the expert distribution: per-layer, per-expert token-slot counts
over the last `window_s` seconds, for `GET /v1/experts/distribution`.

It costs nothing on the hot path: it is fed, on the coordinator's asyncio thread, with the
meter's cumulative load matrix ([layers, experts] token-slots since start, the snapshot's
"load") at every metrics tick and every read, and keeps the differences in one-second buckets
(int64 [layers, experts] each, at most `max_window_s` of them). A window is the sum of the
buckets that started within it, so its edges are exact to `bucket_s` (and to the metrics tick:
routing since the last feed shows at the next one; a read feeds first).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class ExpertWindow:
    def __init__(self, bucket_s: float = 1.0, max_window_s: float = 600.0) -> None:
        self.bucket_s = bucket_s
        self.max_window_s = max_window_s
        self.buckets: deque[tuple[int, np.ndarray]] = deque()  # (bucket index, [layers, experts] delta)
        self.previous: np.ndarray | None = None  # the last cumulative matrix fed
        self.started: float | None = None

    def feed(self, cumulative: list | np.ndarray | None, now: float) -> None:
        """cumulative: [layers, experts] token-slots since start (None: no MoE pass yet)."""
        if cumulative is None:
            return
        counts = np.asarray(cumulative, dtype=np.int64)
        if self.started is None:
            self.started = now
        if self.previous is None or self.previous.shape != counts.shape:
            delta = counts  # first feed (or a new model shape): everything so far lands now
        else:
            delta = counts - self.previous
        self.previous = counts.copy()
        index = math.floor(now / self.bucket_s)
        if delta.any():
            if self.buckets and self.buckets[-1][0] == index and self.buckets[-1][1].shape == delta.shape:
                self.buckets[-1][1][...] += delta
            else:
                self.buckets.append((index, delta.copy()))
        oldest = index - math.ceil(self.max_window_s / self.bucket_s)
        while self.buckets and self.buckets[0][0] < oldest:
            self.buckets.popleft()

    def read(self, window_s: float, now: float) -> dict:
        """{"window_s", "from", "to", "layers", "experts", "counts" [layers][experts], "total"}.
        window_s is clipped to max_window_s; counts is empty before the first MoE pass."""
        window_s = min(max(window_s, self.bucket_s), self.max_window_s)
        first = math.floor((now - window_s) / self.bucket_s) + 1
        if self.previous is None:
            return {"window_s": window_s, "from": now - window_s, "to": now, "layers": 0, "experts": 0,
                    "counts": [], "total": 0}
        total = np.zeros_like(self.previous)
        for index, delta in self.buckets:
            if index >= first and delta.shape == total.shape:
                total += delta
        layers, experts = total.shape
        return {"window_s": window_s, "from": first * self.bucket_s, "to": now, "layers": int(layers),
                "experts": int(experts), "counts": total.tolist(), "total": int(total.sum())}


def to_csv(reading: dict) -> str:
    """A reading as CSV: one `layer,expert,tokens` row per expert."""
    lines = ["layer,expert,tokens"]
    for layer, row in enumerate(reading["counts"]):
        lines.extend(f"{layer},{expert},{count}" for expert, count in enumerate(row))
    return "\n".join(lines) + "\n"
