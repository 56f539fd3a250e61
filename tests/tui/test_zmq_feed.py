"""ZmqFeed against a real publisher on 127.0.0.1: link events, decoding, draining, failure.

The publisher is an XPUB, so the test knows when the feed's subscription has arrived and
publishes only then (no slow-joiner sleep). Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import zmq
import zmq.asyncio

from tui.feed import BadMessage, Connected, Disconnected, FeedError, Snapshot, ZmqFeed

TIMEOUT_S = 20  # first use imports mesh.protocol, and with it torch


@pytest.fixture
async def xpub():
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)
    ctx.destroy(linger=0)


async def test_zmq_feed_connects_decodes_drains_and_sees_the_publisher_go(xpub):
    protocol = pytest.importorskip("mesh.protocol")
    pub, address = xpub
    feed = ZmqFeed(address, interval=1.0)
    events = feed.__aiter__()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            assert await anext(events) == Connected(address)
            assert await pub.recv() == b"\x01"  # the feed's subscribe-to-everything
            for seq in (1, 2, 3):
                payload = {"seq": seq, "billing": {"gb_s": 1.5 * seq}}
                await pub.send_multipart(protocol.encode(protocol.MetricsSnapshot(seq=seq, time=100.0 + seq, payload=payload)))
            seen = []
            while not seen or seen[-1].seq != 3:
                event = await anext(events)
                assert isinstance(event, Snapshot)
                seen.append(event)
            assert [s.seq for s in seen] == sorted(s.seq for s in seen)
            assert len(seen) + feed.dropped == 3  # older ones skipped, never reordered
            assert seen[-1].payload == {"seq": 3, "billing": {"gb_s": 4.5}}

            await pub.send_multipart([b"\xfe", b"junk"])
            assert isinstance(await anext(events), BadMessage)

            pub.close(linger=0)
            assert await anext(events) == Disconnected("publisher went away")
    finally:
        await events.aclose()


async def test_zmq_feed_without_mesh_protocol_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "mesh.protocol", None)  # importing it now raises ImportError
    with pytest.raises(FeedError, match="mesh.protocol is not importable"):
        await anext(ZmqFeed("tcp://127.0.0.1:1").__aiter__())
