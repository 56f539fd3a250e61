"""Messages the feed worker posts to the app; the app hands snapshots on to the panels.

Times are the app's clock (`make_app(clock=...)`) at receipt, not the meter's, so the
stale check compares like with like and tests can freeze it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class SnapshotReceived(Message):
    payload: dict[str, Any]
    received_at: float


@dataclass
class LinkChanged(Message):
    """The feed's link to the meter came up (`up`) or went down, with a reason to show."""

    up: bool
    reason: str
    at: float


@dataclass
class SnapshotRejected(Message):
    """A message on the feed that was not a well-formed snapshot."""

    reason: str
    at: float


@dataclass
class FeedEnded(Message):
    """The feed stopped: it ran out (a script) or failed; `reason` says which."""

    reason: str
    at: float
