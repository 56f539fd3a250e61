"""The node daemon as a real process (`python -m nodes.daemon`), with the test playing the
coordinator: a ROUTER on a random port, run by a thread that acknowledges registrations and
pings the node (Paranoid Pirate), and keeps every other message for the tests to wait on.

One daemon (and its zygote) serves the whole module; the last test kills it with SIGKILL and
checks that nothing it started survives."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
import zmq

from mesh.config import MeshConfig
from mesh.errors import ProtocolError
from mesh.protocol import (
    ExpertCall,
    ExpertResult,
    InstanceReady,
    InstanceStopped,
    Message,
    NodeHeartbeat,
    NodeRegister,
    Ping,
    Pong,
    RegisterAck,
    Shutdown,
    SpawnFailed,
    SpawnFunction,
    StopFunction,
    decode,
    encode,
)
from nodes.daemon import DaemonSettings, NodeDaemon
from nodes.limits import Cgroups
from nodes.model.checkpoint import Checkpoint
from nodes.worker import read_run_record
from tests.nodes.test_worker import HIDDEN, make_checkpoint

NODE = f"t{uuid.uuid4().hex[:8]}"  # its own cgroups, apart from any other daemon here
TIMEOUT_S = 60.0  # a fresh interpreter imports torch: seconds on a busy 2-core machine
HEARTBEAT_S = 0.2
LIVENESS = 10


class FakeCoordinator(threading.Thread):
    """Owns the control ROUTER; tests talk to it through `send` and `wait_for`. While `silent`
    is set it sends no pings (registrations are still acknowledged)."""

    def __init__(self, node: str = NODE) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.silent = threading.Event()
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.messages: list[Message] = []
        self.cond = threading.Condition()
        self.done = threading.Event()
        self.ping_seq = 0

    def run(self) -> None:
        next_ping = time.monotonic()
        while not self.done.is_set():
            if self.sock.poll(20):
                _, *frames = self.sock.recv_multipart()
                try:
                    msg = decode(frames)
                except ProtocolError as exc:
                    raise AssertionError(f"the daemon sent an undecodable message: {exc}") from exc
                if isinstance(msg, NodeRegister):
                    self._send(encode(RegisterAck(self.node, HEARTBEAT_S, LIVENESS)))
                with self.cond:
                    self.messages.append(msg)
                    self.cond.notify_all()
            while not self.outbox.empty():
                self._send(self.outbox.get())
            if time.monotonic() >= next_ping:  # the coordinator's own ping schedule
                if not self.silent.is_set():
                    self._send(encode(Ping(self.ping_seq)))
                    self.ping_seq += 1
                next_ping += HEARTBEAT_S
        self.sock.close(linger=0)
        self.context.term()

    def _send(self, frames) -> None:
        self.sock.send_multipart([self.node.encode(), *frames])

    def send(self, msg: Message | list[bytes]) -> None:
        self.outbox.put(msg if isinstance(msg, list) else encode(msg))

    def wait_for(self, match: Callable[[Message], bool], timeout_s: float = TIMEOUT_S) -> Message:
        """The first message (received so far or later) that matches; it is consumed."""
        found: list[Message] = []

        def seen() -> bool:
            for i, msg in enumerate(self.messages):
                if match(msg):
                    found.append(self.messages.pop(i))
                    return True
            return False

        with self.cond:
            if not self.cond.wait_for(seen, timeout_s):
                raise TimeoutError(f"no matching message from the daemon within {timeout_s}s")
        return found[0]

    def drop_all(self) -> None:
        with self.cond:
            self.messages.clear()

    def about(self, instance_id: str, *types: type, timeout_s: float = TIMEOUT_S) -> Message:
        return self.wait_for(
            lambda m: isinstance(m, types) and getattr(m, "instance_id", None) == instance_id,
            timeout_s,
        )


def gone(pid: int, timeout_s: float) -> bool:
    """Wait until process `pid` has exited (a zombie counts as exited), up to timeout_s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)  # readable once it exits
        return bool(readable)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    ckpt = make_checkpoint(root / "ckpt")
    run_dir = root / "run"
    coordinator = FakeCoordinator()
    coordinator.start()
    config = MeshConfig.from_dict({
        "hosts": [{"name": "local", "address": "127.0.0.1"}],
        "nodes": [{"name": NODE, "host": "local", "capacity_gb": 4.0, "cpus": 2.0}],
        # Two threads per worker: forked workers compute with more threads than the zygote
        # warmed with, the case OpenMP's fork hazard would hang (DESIGN "Transport rules").
        "functions": {"spawn": "zygote", "cgroups": "auto", "keep_alive_s": 60.0,
                      "threads_per_function": 2},
        "coordinator": {"heartbeat_s": HEARTBEAT_S, "liveness": LIVENESS},
    })
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nodes.daemon", "--node", NODE, "--control", coordinator.endpoint,
         "--config-json", json.dumps(config.to_dict()), "--run-dir", str(run_dir)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    state = dict(coordinator=coordinator, daemon=daemon, ckpt=ckpt, run_dir=run_dir, root=root,
                 experts=Checkpoint(ckpt).load_experts([(0, 1), (0, 2)]), ready={})
    yield state
    if daemon.poll() is None:
        daemon.kill()
    daemon.wait(timeout=10)
    coordinator.done.set()
    coordinator.join(timeout=10)
    cgroups = Cgroups(NODE)  # the SIGKILLed daemon could not remove its instances' groups
    cgroups.sweep()
    cgroups.close()


def spawn(mesh, instance_id: str, how: str, keep_alive_s: float = 60.0, experts=((0, 1), (0, 2)),
          start_delay_s: float = 0.0):
    mesh["coordinator"].send(SpawnFunction(
        instance_id=instance_id, function_id="f0", experts=[tuple(e) for e in experts],
        memory_gb=1.0, cpu_share=1.0, keep_alive_s=keep_alive_s, spawn=how,
        model_path=str(mesh["ckpt"]), start_delay_s=start_delay_s,
    ))


def serves_a_call(mesh, endpoint: str) -> None:
    context = zmq.Context.instance()
    caller = context.socket(zmq.DEALER)
    caller.setsockopt(zmq.LINGER, 0)
    caller.connect(endpoint)
    try:
        x = torch.randn(3, HIDDEN)
        caller.send_multipart(encode(ExpertCall(1, 0, [2, 1], [1, 2], x)))
        assert caller.poll(10_000), f"no reply from {endpoint}"
        result = decode(caller.recv_multipart())
    finally:
        caller.close()
    assert isinstance(result, ExpertResult), result
    experts = mesh["experts"]
    with torch.no_grad():
        expected = torch.cat([experts[(0, 2)](x[:1]), experts[(0, 1)](x[1:])])
    torch.testing.assert_close(result.y, expected, atol=1e-6, rtol=0)


def test_registers(mesh):
    register = mesh["coordinator"].wait_for(lambda m: isinstance(m, NodeRegister))
    assert register.node_id == NODE and register.pid == mesh["daemon"].pid
    assert register.zygote and register.capacity_gb == 4.0 and register.cpus == 2.0


def test_spawn_via_zygote_and_fresh(mesh):
    coordinator = mesh["coordinator"]
    # Time the zygote path from a warm zygote (as a running node has), not from daemon start.
    coordinator.wait_for(lambda m: isinstance(m, NodeHeartbeat) and m.resources.get("zygote"))
    took = {}
    for how in ("zygote", "fresh"):
        instance_id = f"i-{how}"
        start = time.perf_counter()
        spawn(mesh, instance_id, how)
        ready = coordinator.about(instance_id, InstanceReady, SpawnFailed)
        took[how] = time.perf_counter() - start
        assert isinstance(ready, InstanceReady), ready
        assert set(ready.stages) == {"spawn", "limits", "weights", "ready"}
        assert ready.node_id == NODE and psutil.pid_exists(ready.pid)
        if ready.cgroup is not None:  # limits applied: read back, and the worker is inside
            assert ready.cgroup["memory_limit_bytes"] == 1 << 30
            assert ready.cgroup["cpu_quota_us"] == ready.cgroup["cpu_period_us"]
            assert f"/moemesh/{NODE}/{instance_id}" in Path(f"/proc/{ready.pid}/cgroup").read_text()
        else:
            assert ready.cgroup_skipped
        serves_a_call(mesh, ready.endpoint)
        mesh["ready"][instance_id] = ready
    print(f"\ntime to ready: zygote {took['zygote']:.3f}s, fresh {took['fresh']:.3f}s "
          f"(stages: zygote {mesh['ready']['i-zygote'].stages}, fresh {mesh['ready']['i-fresh'].stages})")


def test_cold_starts_wait_their_turn_at_the_init_gate(mesh):
    """The node (2 vCPUs) admits cold starts into fork + INIT while their CPU shares fit: four
    one-vCPU instances requested at once run two at a time. Each holds its share for at least
    its start delay d, so the last two waited for one of the first two to be ready: their
    "spawn" stage (request to the worker's first line, the delay included) is at least 2d, a
    bound from the order of events, not from how fast this machine is."""
    delay = 1.0
    ids = [f"i-gate{k}" for k in range(4)]
    for instance_id in ids:
        spawn(mesh, instance_id, "zygote", start_delay_s=delay)
    readies = [mesh["coordinator"].about(i, InstanceReady, SpawnFailed) for i in ids]
    assert all(isinstance(r, InstanceReady) for r in readies), readies
    waited = sorted(r.stages["spawn"] for r in readies)
    assert waited[2] >= 2 * delay - 0.01 and waited[3] >= 2 * delay - 0.01, waited
    for instance_id in ids:
        mesh["coordinator"].send(StopFunction(instance_id, "test"))
    for instance_id in ids:
        assert mesh["coordinator"].about(instance_id, InstanceStopped).reason == "requested"


def test_heartbeat_lists_instances(mesh):
    beat = mesh["coordinator"].wait_for(
        lambda m: isinstance(m, NodeHeartbeat)
        and any(i["instance_id"] == "i-fresh" and i["state"] == "ready" for i in m.instances)
    )
    listed = {i["instance_id"]: i for i in beat.instances}
    assert listed["i-fresh"]["pid"] == mesh["ready"]["i-fresh"].pid
    assert listed["i-fresh"]["endpoint"] == mesh["ready"]["i-fresh"].endpoint
    assert listed["i-fresh"]["memory_gb"] == 1.0 and listed["i-fresh"]["rss_bytes"] > 0
    assert beat.resources["cpus"] >= 1 and beat.resources["mem_total_gb"] > 0


def test_stop_function_answers_requested(mesh):
    ready = mesh["ready"]["i-zygote"]
    mesh["coordinator"].send(StopFunction("i-zygote", "test"))
    stopped = mesh["coordinator"].about("i-zygote", InstanceStopped)
    assert stopped.reason == "requested" and stopped.exit_code == 0
    record = read_run_record(mesh["run_dir"], "i-zygote")
    assert (stopped.started_at, stopped.stopped_at) == (record["started_at"], record["stopped_at"])
    assert stopped.started_at == ready.started_at
    if ready.cgroup is not None:
        assert not Path(ready.cgroup["memory_path"]).exists()
        assert not Path(ready.cgroup["cpu_path"]).exists()


def test_scale_to_zero_answers_idle(mesh):
    spawn(mesh, "i-idle", "zygote", keep_alive_s=0.3, start_delay_s=0.2)
    ready = mesh["coordinator"].about("i-idle", InstanceReady, SpawnFailed)
    assert isinstance(ready, InstanceReady) and ready.stages["spawn"] >= 0.2  # the start delay
    stopped = mesh["coordinator"].about("i-idle", InstanceStopped)
    assert stopped.reason == "idle" and stopped.exit_code == 0
    assert stopped.stopped_at - stopped.started_at >= 0.3


def test_kill_9_answers_died(mesh):
    spawn(mesh, "i-doomed", "zygote")
    ready = mesh["coordinator"].about("i-doomed", InstanceReady, SpawnFailed)
    os.kill(ready.pid, signal.SIGKILL)
    stopped = mesh["coordinator"].about("i-doomed", InstanceStopped)
    assert stopped.reason == "died" and stopped.exit_code == -signal.SIGKILL
    assert stopped.stopped_at >= stopped.started_at


def test_spawn_failed_says_why(mesh):
    spawn(mesh, "i-bad", "zygote", experts=[(9, 0)])
    failed = mesh["coordinator"].about("i-bad", SpawnFailed, InstanceReady)
    assert isinstance(failed, SpawnFailed) and "unknown expert (9, 0)" in failed.error
    spawn(mesh, "i-fresh", "fresh")  # the id is taken
    failed = mesh["coordinator"].about("i-fresh", SpawnFailed, InstanceReady)
    assert isinstance(failed, SpawnFailed) and "already runs" in failed.error


def test_malformed_frames_from_the_coordinator_are_dropped(mesh):
    coordinator = mesh["coordinator"]
    coordinator.send([b"\x99", b"junk"])
    coordinator.send([bytes((0x23,)), b"\xc1"])  # a SpawnFunction with a broken header
    coordinator.send(Ping(10_000))
    assert coordinator.wait_for(lambda m: m == Pong(10_000)) == Pong(10_000)
    assert mesh["daemon"].poll() is None


def test_silent_coordinator_means_reconnect_and_register_again(mesh):
    coordinator = mesh["coordinator"]
    coordinator.silent.set()  # no pings: after LIVENESS x HEARTBEAT_S the node gives up on us
    try:
        again = coordinator.wait_for(lambda m: isinstance(m, NodeRegister), timeout_s=HEARTBEAT_S * LIVENESS + 10)
    finally:
        coordinator.silent.clear()
    assert again.node_id == NODE and again.pid == mesh["daemon"].pid
    coordinator.drop_all()
    beat = coordinator.wait_for(  # its instances kept running through the reconnection
        lambda m: isinstance(m, NodeHeartbeat) and any(i["instance_id"] == "i-fresh" for i in m.instances)
    )
    assert beat.seq > 0


def test_daemon_kill_9_leaves_no_orphans(mesh):
    spawn(mesh, "i-last", "zygote")
    last = mesh["coordinator"].about("i-last", InstanceReady, SpawnFailed)
    assert isinstance(last, InstanceReady)
    daemon = psutil.Process(mesh["daemon"].pid)
    descendants = daemon.children(recursive=True)
    pids = {p.pid for p in descendants}
    assert {last.pid, mesh["ready"]["i-fresh"].pid} <= pids  # a forked and a fresh worker
    assert any("nodes.zygote" in " ".join(p.cmdline()) for p in descendants)
    mesh["daemon"].kill()
    mesh["daemon"].wait(timeout=10)
    survivors = [pid for pid in pids if not gone(pid, timeout_s=10.0)]
    assert survivors == [], f"left behind: {survivors}"


def test_shutdown_stops_every_instance_and_the_zygote(tmp_path):
    """Shutdown (what SIGTERM does too), with the daemon embedded on a thread of this process."""
    node = f"s{uuid.uuid4().hex[:8]}"
    coordinator = FakeCoordinator(node)
    coordinator.start()
    settings = DaemonSettings(node=node, control=coordinator.endpoint, run_dir=str(tmp_path / "run"),
                              heartbeat_interval_s=HEARTBEAT_S, liveness=LIVENESS)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(code=asyncio.run(NodeDaemon(settings).run())))
    thread.start()
    try:
        coordinator.wait_for(lambda m: isinstance(m, NodeRegister))
        coordinator.send(SpawnFunction(
            instance_id="i-one", function_id="f0", experts=[(0, 1)], memory_gb=0.5, cpu_share=0.5,
            keep_alive_s=60.0, spawn="zygote", model_path=str(make_checkpoint(tmp_path / "ckpt")),
        ))
        ready = coordinator.about("i-one", InstanceReady, SpawnFailed)
        assert isinstance(ready, InstanceReady), ready
        zygote = psutil.Process(ready.pid).ppid()
        coordinator.send(Shutdown("test over"))
        stopped = coordinator.about("i-one", InstanceStopped)
        assert stopped.reason == "shutdown" and stopped.exit_code == 0
        thread.join(timeout=30)
        assert outcome.get("code") == 0
        assert gone(ready.pid, 5.0) and gone(zygote, 5.0)
        if ready.cgroup is not None:
            assert not Path(ready.cgroup["memory_path"]).exists()
            assert not Path(ready.cgroup["memory_path"]).parent.exists()  # moemesh/<node>
    finally:
        if thread.is_alive():
            coordinator.send(Shutdown("cleanup"))
            thread.join(timeout=30)
        coordinator.done.set()
        coordinator.join(timeout=10)
