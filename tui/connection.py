"""What the header says about the feed: live, stale, reconnecting, waiting or ended.

Pure bookkeeping, fed by the app's messages and read with the app's clock. "Stale" means
the link may look fine but no snapshot came for more than `STALE_INTERVALS` publish
intervals (a wedged meter, or a publisher that died without closing its socket).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tui import format as fmt

STALE_INTERVALS = 3


class LinkState(StrEnum):
    WAITING = "waiting"
    LIVE = "live"
    STALE = "stale"
    RECONNECTING = "reconnecting"
    ENDED = "ended"


@dataclass
class Connection:
    interval: float
    link_up: bool | None = None  # None: the feed has said nothing about its link
    reason: str = ""
    last_snapshot_at: float | None = None
    rejected: int = 0
    last_rejection: str = ""
    ended: str | None = None

    def state(self, now: float) -> LinkState:
        if self.ended is not None:
            return LinkState.ENDED
        if self.link_up is False:
            return LinkState.RECONNECTING
        if self.last_snapshot_at is None:
            return LinkState.WAITING
        if now - self.last_snapshot_at > STALE_INTERVALS * self.interval:
            return LinkState.STALE
        return LinkState.LIVE

    def describe(self, now: float) -> str:
        state = self.state(now)
        age = self._age(now)
        if state is LinkState.ENDED:
            return f"feed ended: {self.ended}{age}"
        if state is LinkState.RECONNECTING:
            return f"reconnecting: {self.reason}{age}"
        if state is LinkState.WAITING:
            return "waiting for the first snapshot"
        if state is LinkState.STALE:
            return f"stale: no snapshot for {fmt.seconds(now - self.last_snapshot_at)}"
        return "live"

    def _age(self, now: float) -> str:
        if self.last_snapshot_at is None:
            return ""
        return f" (last snapshot {fmt.ago(self.last_snapshot_at, now)})"
