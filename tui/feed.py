"""Where the dashboard's snapshots come from: the meter's PUB socket, or a script.

A feed is an async iterator of `FeedEvent`s. The app consumes one feed in one worker and
stamps each event with its own clock, so staleness ("no snapshot for 3 intervals") is
judged by the app, the same way for every feed, and tests can drive it with a fake clock.

    ZmqFeed("tcp://127.0.0.1:5560")   SUB to the meter, decode with mesh.protocol, report
                                       link changes from a socket monitor
    FakeFeed([payload, ...])           a script, then whatever a test `push`es; `--demo`
                                       plays an endless synthetic script at a pace

ZeroMQ reconnects by itself (with ZMTP heartbeats a dead publisher is noticed even without
a TCP reset); this module only reports what the link does. A feed raises `FeedError` when
it cannot work at all; the app shows the reason and keeps the last figures on screen.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One meter snapshot: its payload (schema owned by the meter) and the envelope's seq."""

    payload: dict[str, Any]
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Connected:
    endpoint: str = ""


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A message arrived that is not a well-formed MetricsSnapshot; counted, not shown."""

    reason: str


FeedEvent = Snapshot | Connected | Disconnected | BadMessage


class FeedError(Exception):
    """The feed cannot work at all (e.g. mesh.protocol cannot be imported)."""


class Feed(Protocol):
    def __aiter__(self) -> AsyncIterator[FeedEvent]: ...


# ------------------------------------------------------------------------------ fake / demo


_CLOSE = object()


class FakeFeed:
    """Plays `script` (payload dicts or FeedEvents; may be endless), `interval` seconds
    apart, then yields whatever `push` adds until `close`.

    Tests synchronise on consumption, never on time: `await feed.push(p)` returns once the
    consumer has taken `p` and come back for the next event, and `await feed.drained()`
    once the script has been taken the same way.
    """

    def __init__(self, script: Iterable[dict[str, Any] | FeedEvent] = (), *, interval: float = 0.0):
        self._script = script
        self.interval = interval
        self._pushed: asyncio.Queue[object] = asyncio.Queue()
        self._script_done = asyncio.Event()

    async def push(self, item: dict[str, Any] | FeedEvent) -> None:
        self._pushed.put_nowait(item)
        await self._pushed.join()

    async def drained(self) -> None:
        await self._script_done.wait()
        await self._pushed.join()

    def close(self) -> None:
        self._pushed.put_nowait(_CLOSE)

    async def __aiter__(self) -> AsyncIterator[FeedEvent]:
        for item in self._script:
            yield _as_event(item)
            if self.interval > 0:
                await asyncio.sleep(self.interval)  # pacing for --demo; tests use interval=0
        self._script_done.set()
        while (item := await self._pushed.get()) is not _CLOSE:
            yield _as_event(item)
            self._pushed.task_done()
        self._pushed.task_done()


def _as_event(item: dict[str, Any] | FeedEvent) -> FeedEvent:
    return Snapshot(item) if isinstance(item, dict) else item


# ------------------------------------------------------------------------------------- zmq


_LINK_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


@dataclass
class ZmqFeed:
    """SUB to the meter's PUB at `address`, yielding the newest snapshot each time it wakes.

    interval:  the meter's publish interval (s); ZMTP heartbeats every interval and a link
               silent for 3 intervals is dropped and redialled by libzmq.
    rcvhwm:    messages queued before libzmq drops; kept small because only the newest
               snapshot matters (CONFLATE would do that, but not for multipart messages).
    config:    a MeshConfig (`--config launch.toml`): the feed dials with its [security]
               client keys where CURVE is on, as the SDK does; None: plain.
    """

    address: str
    interval: float = 1.0
    rcvhwm: int = 4
    config: object = None  # a MeshConfig: dial with its [security] keys (CURVE) where it says so
    dropped: int = field(default=0, init=False)  # snapshots skipped by draining to the newest

    async def __aiter__(self) -> AsyncIterator[FeedEvent]:
        protocol = await _load_protocol()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        importlib.import_module("mesh.sockets").harden(sock, "metrics", self.config, connect=self.address)
        sock.linger = 0
        sock.rcvhwm = self.rcvhwm
        sock.heartbeat_ivl = max(int(self.interval * 1000), 100)
        sock.heartbeat_timeout = 3 * sock.heartbeat_ivl
        sock.subscribe(b"")
        monitor = sock.get_monitor_socket(_LINK_EVENTS)
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        linked: bool | None = None
        try:
            sock.connect(self.address)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    event = self._link_event(parse_monitor_message(await monitor.recv_multipart()), linked)
                    if event is not None:
                        linked = isinstance(event, Connected)
                        yield event
                if sock in ready:
                    yield _decode(protocol, await self._newest(sock))
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.destroy(linger=0)

    async def _newest(self, sock: zmq.asyncio.Socket) -> list[bytes]:
        frames = await sock.recv_multipart()
        while True:
            try:
                newer = await sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return frames
            frames = newer
            self.dropped += 1

    def _link_event(self, event: dict[str, Any], linked: bool | None) -> FeedEvent | None:
        """A Connected/Disconnected for a monitor event that changes the link's state."""
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return Connected(self.address)
        if linked is False:
            return None  # already reported; libzmq keeps retrying on its own
        if kind == zmq.EVENT_DISCONNECTED:
            return Disconnected("publisher went away")
        if kind == zmq.EVENT_CONNECT_RETRIED:
            return Disconnected(f"cannot reach {self.address}")
        return Disconnected(f"handshake with {self.address} failed")


async def _load_protocol() -> Any:
    """mesh.protocol, imported off the event loop (it imports torch, which takes seconds)."""
    try:
        return await asyncio.to_thread(importlib.import_module, "mesh.protocol")
    except ImportError as exc:
        raise FeedError(f"cannot decode snapshots: mesh.protocol is not importable ({exc})") from exc


def _decode(protocol: Any, frames: list[bytes]) -> FeedEvent:
    try:
        msg = protocol.decode(frames)
    except protocol.ProtocolError as exc:
        return BadMessage(f"{type(exc).__name__}: {exc}")
    if not isinstance(msg, protocol.MetricsSnapshot):
        return BadMessage(f"expected MetricsSnapshot, got {type(msg).__name__}")
    return Snapshot(msg.payload, seq=msg.seq)
