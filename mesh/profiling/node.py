"""A real node daemon (`python -m nodes.daemon`, its zygote, its cgroups) under a control plane
made of the coordinator's own pieces (mesh/control.py): the same control ROUTER, RegisterAck
and SpawnFunction as the mesh's, so a profiled instance is started exactly as a served one.

    Node ──Popen──► nodes.daemon ──DEALER──► ControlPlane (a thread: ROUTER, acks, pings)
      spawn(experts, memory_gb) ──SpawnFunction──►  ◄── InstanceReady | SpawnFailed
      stop(instance_id)         ──StopFunction───►  ◄── InstanceStopped

Not the coordinator process itself: that one plans, loads the model and needs the profiles
this measures, and its asyncio loop would add its own latency to every spawn timed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import zmq

from mesh.config import MeshConfig
from mesh.control import bind_control, register_ack, spawn_request
from mesh.errors import MeshError, ProtocolError
from mesh.protocol import (
    InstanceReady,
    InstanceStopped,
    NodeHeartbeat,
    NodeRegister,
    Ping,
    Shutdown,
    SpawnFailed,
    StopFunction,
    decode,
    encode,
)
from mesh.sockets import harden
from nodes.procs import die_with_parent

HEARTBEAT_S = 0.5
LIVENESS = 20  # 10 s of silence before the daemon reconnects: never during a measurement
KEEP_ALIVE_S = 600.0  # no instance scales to zero while it is measured
READY_TIMEOUT_S = 120.0


class ControlPlane(threading.Thread):
    """The coordinator's control ROUTER for one node (mesh.control.bind_control): acknowledges
    the registration (register_ack), pings the node every heartbeat, sends what it is given and
    keeps every other message for `wait_for`."""

    def __init__(self, node: str, config: MeshConfig) -> None:
        super().__init__(daemon=True, name=f"control-{node}")
        self.node = node
        self.config = config
        self.context = zmq.Context()
        self.sock, self.endpoint = bind_control(self.context, config)
        # send() pushes from the caller's thread; the control thread forwards at once (a poll
        # timeout would add up to its length to every spawn this module times). An inproc pair:
        # the control role's limits, no CURVE (no config: nothing leaves this process).
        inbox = f"inproc://control-{uuid.uuid4().hex}"
        self.outbox = self.context.socket(zmq.PULL)
        harden(self.outbox, "control", bind=inbox)
        self.outbox.bind(inbox)
        self.pusher = self.context.socket(zmq.PUSH)
        harden(self.pusher, "control", connect=inbox)
        self.pusher.setsockopt(zmq.LINGER, 0)
        self.pusher.connect(inbox)
        self.messages: list = []
        self.cond = threading.Condition()
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        heartbeat_s = self.config.coordinator.heartbeat_s
        next_ping, seq = time.monotonic(), 0
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(50))
                if self.sock in events:
                    _, *frames = self.sock.recv_multipart()
                    try:
                        msg = decode(frames)
                    except ProtocolError:
                        msg = None
                    if isinstance(msg, NodeRegister):
                        self._send(encode(register_ack(self.node, self.config)))
                    if msg is not None:
                        with self.cond:
                            self.messages.append(msg)
                            self.cond.notify_all()
                if self.outbox in events:
                    self._send(self.outbox.recv_multipart())
                if time.monotonic() >= next_ping:
                    self._send(encode(Ping(seq)))
                    seq, next_ping = seq + 1, time.monotonic() + heartbeat_s
        finally:
            self.sock.close(linger=0)
            self.outbox.close(linger=0)

    def close(self) -> None:
        """Stop the thread and release the sockets (call from the thread that calls send)."""
        self.stop.set()
        if self.is_alive():
            self.join(timeout=10)
        else:
            self.sock.close(linger=0)
            self.outbox.close(linger=0)
        self.pusher.close(linger=0)
        self.context.term()

    def _send(self, frames) -> None:
        try:
            self.sock.send_multipart([self.node.encode(), *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # not connected (yet): the daemon registers again and is pinged then
            pass

    def send(self, msg) -> None:
        self.pusher.send_multipart(encode(msg))

    def wait_for(self, match: Callable, timeout_s: float, alive: Callable[[], bool]):
        """The first message that matches (consumed); MeshError if the daemon dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for i, msg in enumerate(self.messages):
                    if match(msg):
                        return self.messages.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MeshError(f"no answer from the node daemon within {timeout_s:.0f}s", code="timeout")
                if not alive():
                    raise MeshError("the node daemon exited", code="function_failed")
                self.cond.wait(min(left, 0.5))


def node_config(config: MeshConfig, name: str, period_us: int, cpus: float | None = None,
                init_cpus: float | None = None) -> MeshConfig:
    """`config` for one local CPU node `name` with `cpus` (None: every core), CFS period
    `period_us`, the profiler's heartbeat and liveness, no scale to zero and no added start
    delay; its cold starts hold `init_cpus` vCPUs at once (None: as the config gives a node of
    `cpus`)."""
    data = config.to_dict()
    data["hosts"] = [{"name": "local", "address": "127.0.0.1"}]
    data["nodes"] = [{"name": name, "host": "local", "kind": "cpu", "capacity_gb": 64.0,
                      "cpus": float(cpus if cpus is not None else (os.cpu_count() or 1))}]
    data["functions"] = {**data["functions"], "cfs_period_us": int(period_us), "keep_alive_s": KEEP_ALIVE_S,
                         "start_delay_s": 0.0}
    if init_cpus is not None:
        data["functions"]["init_cpus"] = float(init_cpus)
    data["coordinator"] = {**data["coordinator"], "heartbeat_s": HEARTBEAT_S, "liveness": LIVENESS}
    return MeshConfig.from_dict(data)


class Node:
    """A real node daemon (`python -m nodes.daemon`) with its own control plane; a context manager."""

    def __init__(self, config: MeshConfig, model_path: Path, period_us: int, run_dir: Path, tag: str,
                 cpus: float | None = None, init_cpus: float | None = None) -> None:
        self.name = f"profile{tag}-{uuid.uuid4().hex[:6]}"
        self.model_path = model_path
        self.run_dir = run_dir
        self.config = node_config(config, self.name, period_us, cpus, init_cpus)
        self.spawn_how = self.config.functions.spawn
        self.control = ControlPlane(self.name, self.config)
        self.proc: subprocess.Popen | None = None
        self.log_path = run_dir / f"{self.name}.log"
        self.seq = 0

    def __enter__(self) -> Node:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "nodes.daemon", "--node", self.name, "--control", self.control.endpoint,
                     "--config-json", json.dumps(self.config.to_dict()), "--run-dir", str(self.run_dir)],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: die_with_parent(None),
                )
        except BaseException:
            self.control.close()
            raise
        self.control.start()  # after the fork: no thread to copy into the child
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, match: Callable, timeout_s: float = READY_TIMEOUT_S):
        try:
            return self.control.wait_for(match, timeout_s, self.alive)
        except MeshError as exc:
            raise MeshError(f"{exc.message}; daemon log {self.log_path}:\n{self.log_tail()}",
                            code=exc.code, hint="see the node daemon's log above") from None

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_warm(self) -> None:
        """Until the daemon has registered and (spawn = "zygote") its zygote is warm."""
        self.wait(lambda m: isinstance(m, NodeRegister))
        if self.spawn_how == "zygote":
            self.wait(lambda m: isinstance(m, NodeHeartbeat) and m.resources.get("zygote"))

    def spawn(self, experts: list[tuple[int, int]], memory_gb: float) -> tuple[InstanceReady, float]:
        """Start a function as the coordinator does (mesh.control.spawn_request: CPU share
        memory_gb / gb_per_vcpu) and wait until it serves: (InstanceReady, seconds from request to ready)."""
        self.seq += 1
        instance_id = f"{self.name}-{self.seq}"
        start = time.perf_counter()
        self.control.send(spawn_request(instance_id, f"profile-{self.seq}", experts, memory_gb, self.config,
                                        self.model_path))
        msg = self.wait(lambda m: isinstance(m, InstanceReady | SpawnFailed)
                        and m.instance_id == instance_id)
        elapsed = time.perf_counter() - start
        if isinstance(msg, SpawnFailed):
            raise MeshError(f"spawn of {instance_id} ({memory_gb} GB) failed: {msg.error}",
                            code="function_failed", hint="give the functions more memory (--memory)")
        return msg, elapsed

    def request(self, functions: list[tuple[list[tuple[int, int]], float]]) -> list[str]:
        """Request every (experts, memory_gb) function at once, as a plan's cold start does;
        returns their instance ids (collect() waits for them)."""
        ids = []
        for experts, memory_gb in functions:
            self.seq += 1
            ids.append(f"{self.name}-{self.seq}")
            self.control.send(spawn_request(ids[-1], f"profile-{self.seq}", experts, memory_gb, self.config,
                                            self.model_path))
        return ids

    def collect(self, ids: list[str], started: float) -> list[tuple[InstanceReady, float]]:
        """Wait until every requested instance serves: per instance (InstanceReady, seconds from
        `started` (perf_counter) to the moment its ready was seen). Every instance that became
        ready is stopped again if one fails."""
        out, failed = [], None
        for instance_id in ids:
            msg = self.wait(lambda m, i=instance_id: isinstance(m, InstanceReady | SpawnFailed)
                            and m.instance_id == i)
            if isinstance(msg, SpawnFailed):
                failed = failed or msg
                continue
            out.append((msg, time.perf_counter() - started))
        if failed is not None:
            for ready, _ in out:
                self.stop(ready.instance_id)
            raise MeshError(f"spawn of {failed.instance_id} in a burst of {len(ids)} failed: {failed.error}",
                            code="function_failed", hint="give the burst fewer functions (--cold-burst)")
        return out

    def stop(self, instance_id: str) -> None:
        self.control.send(StopFunction(instance_id, "requested"))
        self.wait(lambda m: isinstance(m, InstanceStopped) and m.instance_id == instance_id, 30.0)

    def __exit__(self, *exc) -> None:
        if self.alive():
            self.control.send(Shutdown("profile done"))
            try:
                assert self.proc is not None
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.control.close()
