"""The dashboard on a real mesh: real processes, the meter's real PUB socket, the real app.

1. Requests go through a mesh (static-split, so expert functions cold-start and serve calls),
   then the app, on a `ZmqFeed` of the coordinator's metrics endpoint, must show on its billing
   and SLO panels the figures of the snapshot it received, and those must be the meter's: the
   request counts and SLO attainment of the RequestDone records, the functions and invocations
   of `client.status()`.
2. A subscriber that never reads does not slow the data path: once its link's buffers are
   full the PUB drops its snapshots (ZeroMQ's high-water mark; the coordinator sends with
   NOBLOCK), while requests complete with the right tokens and a reading subscriber keeps
   getting fresh snapshots.

Every wait is on a condition with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from mesh.protocol import MetricsSnapshot, decode
from tests.mesh.conftest import PROMPTS, dump, reference, running_mesh, tiny_model  # noqa: F401 (fixtures)
from tests.mesh.test_mesh_e2e import NEW_TOKENS, generate_all, status
from tests.tui.helpers import SIZE, header, rows, screen_text
from tui import format as fmt
from tui.app import make_app
from tui.feed import ZmqFeed
from tui.messages import SnapshotReceived
from tui.widgets.billing import function_rows

pytestmark = pytest.mark.slow

INTERVAL_S = 0.2  # coordinator.metrics_interval_s of tests/mesh/conftest.py:mesh_config
DEADLINE_S = 240.0  # the feed's first use imports mesh.protocol (torch); the machine is shared
POLICY = {"policy.name": "static-split", "policy.remote": [[0, 0], [1, 1]]}
FAST_INTERVAL_S = 0.002  # test 2: the coordinator publishes as fast as it can build snapshots


def test_dashboard_shows_the_meters_billing_and_slo_figures(tiny_model, reference, tmp_path):  # noqa: F811
    with running_mesh(tiny_model, tmp_path, **POLICY) as mesh:
        address = mesh.endpoints["client"]
        # a cold batch (waits for the functions' cold starts), then a warm one
        cold = asyncio.run(generate_all(address, PROMPTS[:2]))
        warm = asyncio.run(generate_all(address, PROMPTS[2:6]))
        results = cold + warm
        assert [tokens for tokens, _ in results] == reference[:6], dump(mesh)
        done = [d.record for _, d in results]
        asyncio.run(_check_dashboard(mesh, done))


async def _check_dashboard(mesh, done: list[dict]) -> None:
    covered = asyncio.Event()

    def hook(message) -> None:  # runs as each message reaches the app, before its handler
        if isinstance(message, SnapshotReceived) and _covers(message.payload, len(done)):
            covered.set()

    app = make_app(ZmqFeed(mesh.endpoints["metrics"], interval=INTERVAL_S), interval=INTERVAL_S)
    app.animation_level = "none"
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        async with asyncio.timeout(DEADLINE_S):
            await covered.wait()
        await pilot.pause()  # the handler has run: the snapshot is on screen
        assert "● live" in header(app) and app.query_one("#status").has_class("-live"), header(app)
        await pilot.press("p")  # freeze the display; snapshots keep arriving behind it
        await pilot.pause()
        payload = app.shown.payload  # what the panels show
        assert _covers(payload, len(done)) and f"seq {payload['seq']}" in header(app)
        meter = await status(mesh.endpoints["client"])  # read after the snapshot: later, never earlier

        # billing: the panel shows the snapshot's figures ...
        billing = payload["billing"]
        text = screen_text(app)
        assert f"billing ({billing['mode']} mode)" in text
        for key in ("gb_s", "gb_s_main", "gb_s_experts", "baseline_all_local_gb_s"):
            assert fmt.gb_s(billing[key]) in text, (key, billing)
        for key in ("cost", "baseline_all_local_cost"):
            assert fmt.money(billing[key]) in text, (key, billing)
        assert rows(app, "billing-functions") == [[str(c) for c in cells] for _, cells in function_rows(billing)]
        # ... and they are the meter's: the same functions and calls; GB-s only grows
        # (instance mode bills lifetimes, so a later reading is larger, never smaller)
        assert set(billing["by_function"]) == {i["function_id"] for i in meter["instances"]} == {"L0-r0", "L1-r0"}
        assert {f: e["invocations"] for f, e in billing["by_function"].items()} == \
            {f: e["invocations"] for f, e in meter["billing"]["by_function"].items()}
        assert billing["invocations"] == meter["billing"]["invocations"] > 0
        assert 0 < billing["gb_s_experts"] <= meter["billing"]["gb_s_experts"]
        assert 0 < billing["gb_s"] <= meter["billing"]["gb_s"]
        assert billing["gb_s"] == pytest.approx(billing["gb_s_main"] + billing["gb_s_experts"])

        # SLOs: the snapshot's counts and attainment are the RequestDone records' ...
        slo = payload["slo"]
        (name,) = {r["slo_class"] for r in done}
        cls = slo["classes"][name]
        met = sum(r["slo"]["met"] for r in done)
        assert (slo["requests_total"], slo["requests_active"]) == (len(done), 0)
        assert (cls["requests"], cls["attained"]) == (len(done), met)
        assert cls["attainment"] == pytest.approx(met / len(done))
        for key in ("ttft_s", "tpot_s"):
            expected = np.percentile([r[key] for r in done], [50, 95, 99])
            assert [cls[key[:4]][p] for p in ("p50", "p95", "p99")] == pytest.approx(expected.tolist())
        assert slo["classes"] == meter["slo"]["classes"]  # nothing ran in between
        # ... and the panel shows them
        await pilot.press("2")
        await pilot.pause()
        shown = {row[0]: row for row in rows(app, "slo-classes")}
        assert shown[name][:4] == [name, str(len(done)), str(met), fmt.percent(met / len(done))]
        assert shown[name][4:] == [
            fmt.seconds(cls["ttft_target_s"]), *(fmt.seconds(cls["ttft"][p]) for p in ("p50", "p95", "p99")),
            fmt.seconds(cls["tpot_target_s"]), *(fmt.seconds(cls["tpot"][p]) for p in ("p50", "p95", "p99")),
        ]
        assert f"{len(done)} requests · 0 active" in screen_text(app)

        # functions: the snapshot's instances and cold starts (the cold batch waited: "!")
        await pilot.press("5")
        await pilot.pause()
        instances = {r[0]: r[1:5] for r in rows(app, "functions-instances")}
        assert instances == {i["instance_id"]: [i["function_id"], i["node"], i["state"], fmt.gb(i["memory_gb"])]
                             for i in payload["instances"]}
        assert {i["instance_id"] for i in payload["instances"]} == {i["instance_id"] for i in meter["instances"]}
        starts = {r[2]: r[0] == "!" for r in rows(app, "cold-starts")}
        assert starts == {s["instance_id"]: s["critical_path"] for s in payload["cold_starts"]}
        assert len(starts) == 2 and any(starts.values())
        assert "PAUSED" in header(app)  # frozen all along, while snapshots kept arriving


def _covers(payload: dict, requests: int) -> bool:
    slo = payload.get("slo", {})
    return slo.get("requests_total", 0) >= requests and slo.get("requests_active") == 0


def test_a_subscriber_that_never_reads_does_not_slow_the_mesh(tiny_model, reference, tmp_path):  # noqa: F811
    # snapshots as fast as the coordinator makes them, and big ones (all-remote: 8 functions,
    # each in the instance, cold-start and billing lists), to overflow the stuck link in seconds
    overrides = {"policy.name": "all-remote", "coordinator.metrics_interval_s": FAST_INTERVAL_S}
    with running_mesh(tiny_model, tmp_path, **overrides) as mesh:
        asyncio.run(_check_stuck_subscriber(mesh, reference))


async def _check_stuck_subscriber(mesh, expected: list[list[int]]) -> None:
    endpoint = mesh.endpoints["metrics"]
    ctx = zmq.asyncio.Context()
    stuck = _sub(ctx, endpoint, rcvhwm=1, rcvbuf=4096)  # subscribes, then is not read until the end
    task = None
    try:
        async with asyncio.timeout(DEADLINE_S):
            await _handshake(stuck)  # subscribed before the reader: it misses none of the reader's
            reader = Reader(_sub(ctx, endpoint))
            task = asyncio.create_task(reader.run())
            await reader.until(lambda r: r.seqs)
            start = reader.seqs[0]
            results = await generate_all(mesh.endpoints["client"], PROMPTS)
            assert [tokens for tokens, _ in results] == expected, dump(mesh)
            assert all(d.generated_tokens == NEW_TOKENS for _, d in results)
            # the coordinator publishes on, past what the stuck link can hold: the kernel's send
            # buffer (autotuned up to tcp_wmem's max) is the biggest; the receive buffer is set
            # small; ZeroMQ queues 8 + 1 snapshots (SNDHWM, RCVHWM)
            after = reader.seqs[-1]
            overflow = 1.25 * _send_buffer_max_bytes()
            await reader.until(lambda r: r.seqs[-1] > after + 5 and r.published_bytes(start) > overflow)
            assert reader.seqs == sorted(set(reader.seqs))  # fresh ones, in order
            # the stuck subscriber, read at last, got what its buffers held, then a gap: the
            # PUB dropped snapshots for it rather than wait (or slow the requests above)
            newest = reader.seqs[-1]
            got: list[int] = []
            while not got or got[-1] < newest:
                got.append(decode(await stuck.recv_multipart()).seq)
            assert got == sorted(set(got))
            missing = (got[-1] - got[0] + 1) - len(got)
            assert missing > 0, f"nothing dropped between {got[0]} and {got[-1]}"
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        ctx.destroy(linger=0)



def _sub(ctx: zmq.asyncio.Context, endpoint: str, **options: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    for name, value in options.items():
        setattr(sock, name, value)
    sock.subscribe(b"")
    sock.connect(endpoint)
    return sock


async def _handshake(sock: zmq.asyncio.Socket) -> None:
    """Until the socket's connection is up (ZMTP handshake done; the SUB then subscribes)."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        await monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def _send_buffer_max_bytes() -> int:
    """The most the kernel lets a TCP socket's send buffer grow to (autotuning's ceiling)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 2**20


class Reader:
    """A subscriber that reads every snapshot: their seqs and sizes, and a way to wait on them."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.seqs: list[int] = []
        self.sizes: list[int] = []
        self.changed = asyncio.Condition()

    async def run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            msg = decode(frames)
            assert isinstance(msg, MetricsSnapshot)
            async with self.changed:
                self.seqs.append(msg.seq)
                self.sizes.append(sum(len(f) for f in frames))
                self.changed.notify_all()

    def published_bytes(self, since: int) -> int:
        """Bytes the PUB sent per subscriber from seq `since` on: a snapshot this reader missed
        is counted at the size of the next one it got."""
        total, previous = 0, since
        for seq, size in zip(self.seqs, self.sizes):
            if seq > since:
                total += (seq - previous) * size
                previous = seq
        return total

    async def until(self, predicate) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.seqs) and predicate(self))
