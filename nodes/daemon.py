"""The node daemon: one per host. It registers with the coordinator, starts and stops expert
function instances on request, applies their cgroup limits, and reports what they do.

    coordinator ROUTER ◄──DEALER (identity = node name)── daemon ──ROUTER (127.0.0.1:0)──► workers
       NodeRegister ──►  ◄── RegisterAck(interval, liveness)      ◄── InstanceReady / dead sentinels
       NodeHeartbeat ──► every interval (resources, instances)    ──► StopFunction
       ◄── SpawnFunction ──► InstanceReady | SpawnFailed
       ◄── StopFunction  ──► InstanceStopped
       ◄── Shutdown, Ping ──► Pong
                             └─ zygote (stdin/stdout pipes) ──fork──► worker
                             └─ or `python -m nodes.worker` (spawn = "fresh")

    python -m nodes.daemon --node n0 --control tcp://127.0.0.1:5555 \\
        --config-json "$(MeshConfig.to_dict() as JSON)" [--run-dir DIR]

Liveness (Paranoid Pirate): any message from the coordinator counts as a sign of life (it
sends Ping); silent for `liveness x heartbeat_interval_s`, the daemon drops its socket,
reconnects after a capped exponential backoff and registers again. Its instances keep running.
The daemon's own NodeHeartbeat comes from its event loop, so a frozen daemon falls silent.

Worker liveness (application level, from the worker's own serving loop): every
`worker_ping_s` the daemon pings each ready worker over the worker's control DEALER, and the
worker's serving loop answers Pong. A worker with no Pong for `hung_after_s` (default 2 s: a
SIGSTOPped or frozen worker, sockets still open) is killed at once (SIGKILL) and answered
"died". Each instance in NodeHeartbeat carries `heartbeat_age_s` (seconds since its last
Pong) and `hung`, so the coordinator can retire it even before the kill lands. A daemon whose
own loop stalled (its ping tick ran late by more than half of hung_after_s) forgives every
worker that tick: a stall of the judge is not the workers' fault. StopFunction with reason
"hung" kills the instance at once (no grace: it would not hear a StopFunction).

How an instance stops, and the reason its InstanceStopped gives:

    worker exits 0 by itself (keep-alive expired)          "idle"
    StopFunction: the worker is told and exits 0            "requested"  (SIGKILL after
                                                                          stop_grace_s)
    Shutdown or SIGTERM to the daemon: same, for all        "shutdown"
    the worker sent a dead sentinel (InstanceStopped
      "failed") before it exited                            "failed"
    any other exit: a signal (kill -9, the cgroup's OOM
      killer, the daemon's kill of a hung worker) or a
      non-zero code                                         "died"

An instance that ends before it was ready is answered by SpawnFailed (with the worker's own
error, or its exit and the tail of its log) instead. started_at / stopped_at come from the
worker's run record (`<run_dir>/<instance_id>.json`: its own create time and exit time), so
the meter bills the process's real lifetime; stopped_at is the daemon's clock when the worker
could not write it (killed). exit_code is the exit status, or -N for a signal N.

Limits: an instance's cgroups (nodes.limits, `[functions] cgroups`) get SpawnFunction.memory_gb
and cpu_share vCPUs (cpu_share 0: memory_gb / gb_per_vcpu); the worker joins them itself.

No orphans: the zygote and fresh workers die with the daemon (PR_SET_PDEATHSIG), the zygote's
workers with the zygote; SIGTERM stops everything cleanly. A daemon started for a node whose
earlier daemon (same node, same coordinator endpoint) still runs on this host stops that one
first (nodes.fence): after a link cut longer than ssh's ServerAlive, mesh-up starts a new daemon
over a new session while the old one lives on, cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from mesh import security
from mesh.errors import MeshError, ProtocolError
from mesh.protocol import (
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
    ZygoteExited,
    ZygoteForked,
    ZygoteReady,
    ZygoteSpawn,
    decode,
    encode,
)
from mesh.sockets import harden
from nodes import fence, resources
from nodes.init_gate import InitGate
from nodes.limits import Applied, Cgroups, CgroupUnavailable
from nodes.procs import pack, read_message_async
from nodes.worker import WorkerSpec, read_run_record, setup_logging

if TYPE_CHECKING:
    from mesh.config import MeshConfig

log = logging.getLogger("nodes.daemon")

BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 2.0  # a healed link or a restarted coordinator is rejoined within ~2 s
WORKER_PING_S = 0.25  # how often a ready worker is pinged (its serving loop answers Pong)
HUNG_AFTER_S = 2.0  # no Pong for this long: the worker is hung and killed
ZYGOTE_START_TIMEOUT_S = 60.0
FORK_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 8


@dataclass(frozen=True)
class DaemonSettings:
    """What one daemon runs with: its `[[nodes]]` entry and the `[functions]` section.

    host:                 address this node's workers bind their data sockets on (the
                          [[hosts]] address of the node's host)
    spawn:                "zygote" starts the zygote at boot (a SpawnFunction still picks
                          its own way per instance)
    heartbeat_interval_s, liveness: used until the coordinator's RegisterAck says otherwise
    stop_grace_s:         how long a stopped worker may take before SIGKILL
    ready_timeout_s:      how long a spawn may take (plus its start delay) before SIGKILL
    init_cpus:            vCPUs the cold starts in fork + INIT hold at once, each its CPU
                          share (nodes/init_gate.py); the others wait before their fork, in
                          the unbilled "spawn" stage
    worker_ping_s:        how often ready workers are pinged (their serving loop answers)
    hung_after_s:         a ready worker without a Pong for this long is killed as hung
    dtype:                workers load expert weights in the mesh's [model] dtype
    """

    node: str
    control: str
    run_dir: str
    host: str = "127.0.0.1"
    kind: str = "cpu"
    capacity_gb: float = 1.0
    cpus: float = 1.0
    spawn: str = "zygote"
    cgroups: str = "auto"
    cfs_period_us: int = 10_000
    gb_per_vcpu: float = 1.0
    threads_per_function: int = 1
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    stop_grace_s: float = 3.0
    ready_timeout_s: float = 120.0
    init_cpus: float = 1.0
    dtype: str = "float32"
    worker_ping_s: float = WORKER_PING_S
    hung_after_s: float = HUNG_AFTER_S
    security: dict | None = None  # mesh.security.bundle(config): CURVE keys for this node's sockets

    @classmethod
    def from_config(cls, config: MeshConfig, node: str, control: str, run_dir: str) -> DaemonSettings:
        """From a `mesh.config.MeshConfig`: its `[[nodes]]` entry named `node` and `[functions]`."""
        entries = {n.name: n for n in config.nodes}
        if node not in entries:
            raise MeshError(
                f"node {node!r} is not in the config's [[nodes]] ({', '.join(sorted(entries)) or 'none'})",
                code="config_error",
                hint="pass --node with a name from [[nodes]] in launch.toml",
            )
        entry, functions = entries[node], config.functions
        address = {h.name: h.address for h in config.hosts}.get(entry.host, entry.host)  # host name -> IP
        return cls(
            node=node, control=control, run_dir=run_dir, host=address, kind=entry.kind,
            capacity_gb=entry.capacity_gb, cpus=entry.cpus, spawn=functions.spawn,
            cgroups=functions.cgroups, cfs_period_us=functions.cfs_period_us,
            gb_per_vcpu=functions.gb_per_vcpu, threads_per_function=functions.threads_per_function,
            init_cpus=functions.init_capacity(entry.cpus),
            heartbeat_interval_s=config.coordinator.heartbeat_s, liveness=config.coordinator.liveness,
            dtype=config.model.dtype, security=security.bundle(config),
        )


@dataclass
class Instance:
    """One function instance as the daemon tracks it."""

    request: SpawnFunction
    spec: WorkerSpec
    limits: Applied
    pid: int | None = None
    state: str = "starting"  # starting -> ready -> stopping
    ready: InstanceReady | None = None
    stop_reason: str | None = None  # "requested" / "shutdown" once the daemon asked it to stop
    failure: str | None = None  # the worker's own dead sentinel (its error text)
    sentinel_failed: bool = False  # it sent InstanceStopped("failed") while serving
    timed_out: bool = False
    hung: bool = False  # killed because its serving loop stopped answering pings
    last_pong: float = 0.0  # time.monotonic() of its last Pong (or of its InstanceReady)
    via_zygote: bool = False
    forked: asyncio.Future | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def instance_id(self) -> str:
        return self.request.instance_id

    def summary(self) -> dict:
        age = round(time.monotonic() - self.last_pong, 3) if self.ready is not None else None
        return {
            "instance_id": self.instance_id,
            "function_id": self.request.function_id,
            "state": self.state,
            "pid": self.pid or 0,
            "spawn": self.request.spawn,
            "memory_gb": self.request.memory_gb,
            "cpu_share": self.spec.cpu_share,
            "endpoint": self.ready.endpoint if self.ready else "",
            "started_at": self.ready.started_at if self.ready else self.spec.t0,
            "rss_bytes": (resources.process_rss(self.pid) or 0) if self.pid else 0,
            "heartbeat_age_s": age,  # seconds since its serving loop last answered (None: not ready)
            "hung": self.hung,
        }


class ZygoteProcess:
    """The daemon's side of the zygote: start it, ask for forks, hear about exits."""

    def __init__(
        self,
        on_forked: Callable[[ZygoteForked], None],
        on_exited: Callable[[ZygoteExited], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.on_forked, self.on_exited, self.on_lost = on_forked, on_exited, on_lost
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task | None = None
        self.import_s = 0.0
        self.closing = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodes.zygote", "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(asyncio.shield(self.ready), timeout_s)

    def fork(self, spec: WorkerSpec) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(pack(ZygoteSpawn(spec.instance_id, spec.to_dict())))

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while True:
                msg = await read_message_async(self.proc.stdout)
                if msg is None:
                    break
                if isinstance(msg, ZygoteReady):
                    self.import_s = msg.import_s
                    log.info("zygote %d warm (imports %.2fs)", msg.pid, msg.import_s)
                    if not self.ready.done():
                        self.ready.set_result(msg)
                elif isinstance(msg, ZygoteForked):
                    self.on_forked(msg)
                elif isinstance(msg, ZygoteExited):
                    self.on_exited(msg)
        except ProtocolError as exc:
            log.error("unreadable message from the zygote (%s): restarting it", exc)
        code = await self._wait_exit(1.0)
        if self.closing:
            log.info("zygote exited (code %s)", code)
        else:
            log.warning("zygote exited (code %s); the next zygote spawn starts a new one", code)
        if not self.ready.done():
            self.ready.set_exception(MeshError(
                f"the zygote exited with code {code} before it was warm",
                code="function_failed",
                hint="see the node daemon's log (the zygote logs to it); or set [functions] spawn = \"fresh\"",
            ))
        self.on_lost()

    async def _wait_exit(self, timeout_s: float) -> int | None:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    async def close(self) -> None:
        """Close its stdin (it kills and reaps its workers, then exits); kill it if it lingers."""
        self.closing = True
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        await self._wait_exit(5.0)
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class NodeDaemon:
    """`await NodeDaemon(settings).run()` serves until Shutdown or SIGTERM and returns 0.

    Run it on the main thread: its children die with the *thread* that started them
    (PR_SET_PDEATHSIG), and signal handlers need the main thread. Embedded on another thread
    (as a test may), it ends with that thread's loop and is stopped by a Shutdown message.
    """

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cgroups = Cgroups(settings.node, settings.cgroups, settings.cfs_period_us)
        self.instances: dict[str, Instance] = {}
        self.init_gate = InitGate(settings.init_cpus)
        self.context = zmq.asyncio.Context()
        self.control: zmq.asyncio.Socket | None = None
        self.workers: zmq.asyncio.Socket | None = None
        self.worker_endpoint = ""
        self.zygote: ZygoteProcess | None = None
        self.interval_s = settings.heartbeat_interval_s
        self.liveness = settings.liveness
        self.registered = asyncio.Event()
        self.stopping = asyncio.Event()
        self.stopped = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.seq = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(
                    signum, lambda s=signum: self._task(self.shutdown(signal.Signals(s).name))
                )
            except (ValueError, RuntimeError):  # not the main thread (embedded, e.g. in tests)
                log.info("no %s handler outside the main thread: stop it with Shutdown",
                         signal.Signals(signum).name)
        why_not = self.cgroups.probe()
        if why_not:
            log.warning("cgroup limits will be skipped: %s", why_not)
        else:
            log.info("cgroup v%s limits under moemesh/%s", self.cgroups.version, self.settings.node)
            for group in self.cgroups.sweep():
                log.info("removed %s, left behind by an earlier daemon", group)
        self.workers = self.context.socket(zmq.ROUTER)
        harden(self.workers, "workers", self.settings, bind="tcp://127.0.0.1:0", host=self.settings.host)
        self.workers.setsockopt(zmq.LINGER, 0)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker raises, not a silent drop
        self.workers.bind("tcp://127.0.0.1:0")
        self.worker_endpoint = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.settings.spawn == "zygote":
            zygote = await self._start_zygote()
            try:  # a node registers once it can fork: no function's INIT includes the node's boot
                await zygote.wait_ready(ZYGOTE_START_TIMEOUT_S)
            except Exception as exc:
                log.warning("zygote not warm before registering (%s); spawns will wait for it", exc)
        log.info("node %s: run dir %s, workers report to %s", self.settings.node, self.run_dir,
                 self.worker_endpoint)
        self._task(self._worker_loop())
        self._task(self._heartbeats())
        self._task(self._watch_workers())
        try:
            await self._control_loop()
        finally:
            await self._close()
        return 0

    async def shutdown(self, reason: str) -> None:
        """Stop every instance (reason "shutdown"), the zygote, and then the daemon."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("shutting down (%s): stopping %d instances", reason, len(self.instances))
        for inst in list(self.instances.values()):
            self._stop(inst, "shutdown")
        waits = [inst.exited.wait() for inst in self.instances.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self.settings.stop_grace_s + 2.0)
        if self.zygote is not None:
            await self.zygote.close()
        self.stopped.set()

    async def _close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.zygote is not None:
            await self.zygote.close()
        for inst in self.instances.values():  # left only if the daemon ends abnormally
            self._kill(inst)
        if self.control is not None:
            self.control.close(linger=500)  # let the last InstanceStopped messages out
        if self.workers is not None:
            self.workers.close(linger=0)
        self.context.term()
        self.cgroups.close()

    def _task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("daemon task failed", exc_info=task.exception())

    # -- the coordinator ---------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.control is not None:
            self.control.close(linger=0)
        self.control = self.context.socket(zmq.DEALER)
        harden(self.control, "control", self.settings, connect=self.settings.control, host=self.settings.host)
        self.control.setsockopt(zmq.IDENTITY, self.settings.node.encode())
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(self.settings.control)
        self.registered.clear()
        self._send(NodeRegister(
            node_id=self.settings.node, kind=self.settings.kind, host=self.settings.host,
            capacity_gb=self.settings.capacity_gb, cpus=self.settings.cpus, pid=os.getpid(),
            zygote=self.zygote is not None,
        ))

    def _send(self, msg: Message) -> None:
        """Queue a message to the coordinator (dropped while no socket is connected)."""
        if self.control is None:
            log.warning("no coordinator connection: dropped %s", type(msg).__name__)
            return
        _send_frames(self.control, encode(msg), f"{type(msg).__name__} to the coordinator")

    async def _control_loop(self) -> None:
        backoff = BACKOFF_INITIAL_S
        while not self.stopped.is_set():
            self._connect()
            last_heard = time.monotonic()
            while not self.stopped.is_set():
                silent_limit = self.interval_s * self.liveness
                left = silent_limit - (time.monotonic() - last_heard)
                if left <= 0:
                    break
                assert self.control is not None
                if not await self.control.poll(min(left, 0.25) * 1000, zmq.POLLIN):
                    continue
                frames = await self.control.recv_multipart()
                last_heard = time.monotonic()
                try:
                    msg = decode(frames)
                except ProtocolError as exc:
                    log.warning("dropped a malformed message from the coordinator: %s", exc)
                    continue
                if isinstance(msg, RegisterAck):
                    backoff = BACKOFF_INITIAL_S
                self._on_control(msg)
            if self.stopped.is_set():
                break
            log.warning(
                "coordinator silent for %.1fs (liveness %d x heartbeat %.2fs): reconnecting in "
                "%.2fs; check that it runs at %s (--control)", silent_limit, self.liveness,
                self.interval_s, backoff, self.settings.control,
            )
            # Closed during the backoff: a socket left open would deliver its queued
            # NodeRegister to a coordinator that comes up meanwhile, whose RegisterAck nobody
            # reads, and the next connection would reuse the identity of a pipe still open.
            self.registered.clear()
            if self.control is not None:
                self.control.close(linger=0)
                self.control = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _on_control(self, msg: Message) -> None:
        if isinstance(msg, RegisterAck):
            self.interval_s, self.liveness = msg.heartbeat_interval_s, msg.liveness
            self.registered.set()
            log.info("registered with the coordinator (heartbeat %.2fs, liveness %d)",
                     self.interval_s, self.liveness)
        elif isinstance(msg, Ping):
            self._send(Pong(msg.seq))
        elif isinstance(msg, SpawnFunction):
            self._task(self._spawn(msg))
        elif isinstance(msg, StopFunction):
            inst = self.instances.get(msg.instance_id)
            if inst is None:
                log.info("StopFunction for %s: no such instance here (already stopped?)", msg.instance_id)
            elif msg.reason == "hung":  # it would not hear a StopFunction: kill it now
                log.error("%s: the coordinator found it hung; killing it", msg.instance_id)
                inst.hung = True
                self._kill(inst)
            else:
                self._stop(inst, "requested")
        elif isinstance(msg, Shutdown):
            self._task(self.shutdown(f"Shutdown: {msg.reason}"))
        elif not isinstance(msg, Pong):
            log.warning("ignored %s from the coordinator", type(msg).__name__)

    async def _heartbeats(self) -> None:
        resources.snapshot()  # primes psutil's cpu_percent
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.interval_s)
            if self.stopping.is_set() or not self.registered.is_set():
                continue
            live = [inst.summary() for inst in self.instances.values()]
            host = resources.snapshot()
            host.update(
                capacity_gb=self.settings.capacity_gb,
                allocated_gb=sum(i["memory_gb"] for i in live),
                zygote=self.zygote is not None and self.zygote.ready.done(),
            )
            self._send(NodeHeartbeat(self.settings.node, self.seq, host, live))
            self.seq += 1

    # -- spawning -------------------------------------------------------------------------------

    async def _start_zygote(self) -> ZygoteProcess:
        zygote = ZygoteProcess(self._on_forked, self._on_zygote_exited, self._on_zygote_lost)
        self.zygote = zygote
        await zygote.start()
        return zygote

    async def _spawn(self, msg: SpawnFunction) -> None:
        t0 = time.time()
        s = self.settings
        if msg.instance_id in self.instances:
            return self._send(SpawnFailed(msg.instance_id, s.node,
                                          f"instance {msg.instance_id} already runs on node {s.node}; "
                                          "spawn a new instance id"))
        if self.stopping.is_set():
            return self._send(SpawnFailed(msg.instance_id, s.node, f"node {s.node} is shutting down"))
        if "/" in msg.instance_id or msg.instance_id in ("", ".", ".."):
            return self._send(SpawnFailed(msg.instance_id, s.node,
                                          f"instance id {msg.instance_id!r} cannot name a file; "
                                          "use letters, digits, '-' and '_'"))
        cpu_share = msg.cpu_share or msg.memory_gb / s.gb_per_vcpu
        try:
            limits = self.cgroups.apply(msg.instance_id, msg.memory_gb, cpu_share)
        except CgroupUnavailable as exc:
            return self._send(SpawnFailed(msg.instance_id, s.node, str(exc)))
        spec = WorkerSpec(
            instance_id=msg.instance_id, function_id=msg.function_id, node_id=s.node,
            experts=tuple(tuple(e) for e in msg.experts), memory_gb=msg.memory_gb,
            cpu_share=cpu_share, keep_alive_s=msg.keep_alive_s, model_path=msg.model_path,
            threads=s.threads_per_function, host=s.host, daemon_endpoint=self.worker_endpoint,
            run_dir=str(self.run_dir), t0=t0, start_delay_s=msg.start_delay_s,
            cgroup_procs=limits.procs_files, cgroup=limits.values, cgroup_skipped=limits.skipped,
            cgroup_required=s.cgroups == "require", parent_pid=os.getpid(), dtype=s.dtype,
            device=msg.device if s.kind == "gpu" else "cpu", security=s.security,
        )
        inst = Instance(msg, spec, limits, via_zygote=msg.spawn == "zygote")
        self.instances[msg.instance_id] = inst
        try:
            # INIT is one thread at the cgroup's quota: it holds its share, at most one vCPU
            await self.init_gate.enter(msg.instance_id, min(1.0, cpu_share))  # left when ready or ended
            if self.stopping.is_set():
                raise MeshError(f"node {s.node} is shutting down", code="function_failed")
            if inst.via_zygote:
                await self._fork(inst)
            else:
                await self._start_fresh(inst)
        except Exception as exc:
            self.init_gate.leave(msg.instance_id)
            self.instances.pop(msg.instance_id, None)
            self.cgroups.remove(limits)
            error = str(exc) if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
            log.error("spawn of %s failed: %s", msg.instance_id, error)
            return self._send(SpawnFailed(msg.instance_id, s.node, error))
        log.info("spawned %s (%s) as pid %s: experts %s, %.2f GB, %.2f vCPU", msg.instance_id,
                 msg.spawn, inst.pid, list(spec.experts), msg.memory_gb, cpu_share)
        if inst.stop_reason is not None:  # stopped while it was being started
            self._kill(inst)
        deadline = s.ready_timeout_s + msg.start_delay_s
        inst.timers.append(asyncio.get_running_loop().call_later(deadline, self._ready_timeout, inst))

    async def _fork(self, inst: Instance) -> None:
        zygote = self.zygote or await self._start_zygote()
        try:
            await zygote.wait_ready(ZYGOTE_START_TIMEOUT_S)
        except TimeoutError:
            raise MeshError(
                f"the zygote was not warm within {ZYGOTE_START_TIMEOUT_S:.0f}s",
                code="timeout",
                hint="the host may be overloaded; or set [functions] spawn = \"fresh\"",
            ) from None
        inst.forked = asyncio.get_running_loop().create_future()
        zygote.fork(inst.spec)
        try:
            await asyncio.wait_for(asyncio.shield(inst.forked), FORK_TIMEOUT_S)
        except TimeoutError:
            raise MeshError(f"the zygote did not fork within {FORK_TIMEOUT_S:.0f}s", code="timeout",
                            hint="see the node daemon's log; or set [functions] spawn = \"fresh\"") from None

    def _on_forked(self, msg: ZygoteForked) -> None:
        inst = self.instances.get(msg.instance_id)
        if inst is None or inst.forked is None or inst.forked.done():
            log.warning("zygote forked %s for an unknown instance %s", msg.pid, msg.instance_id)
            return
        if msg.pid == 0:
            inst.forked.set_exception(MeshError(f"zygote: {msg.error}", code="function_failed"))
        else:
            inst.pid = msg.pid
            inst.forked.set_result(msg.pid)

    def _on_zygote_exited(self, msg: ZygoteExited) -> None:
        for inst in self.instances.values():
            if inst.via_zygote and inst.pid == msg.pid:
                code = msg.exit_code if msg.signal is None else -msg.signal
                self._task(self._on_exit(inst, code))
                return
        log.info("zygote reaped pid %d (no instance)", msg.pid)

    def _on_zygote_lost(self) -> None:
        """The zygote is gone, and its workers with it (PR_SET_PDEATHSIG)."""
        self.zygote = None
        for inst in list(self.instances.values()):
            if inst.via_zygote and not inst.exited.is_set():
                if inst.forked is not None and not inst.forked.done():
                    inst.forked.set_exception(MeshError("the zygote exited while forking",
                                                        code="function_failed"))
                elif inst.pid:
                    self._task(self._on_exit(inst, -int(signal.SIGKILL), wait_gone=True))

    async def _start_fresh(self, inst: Instance) -> None:
        log_file = open(self.run_dir / f"{inst.instance_id}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nodes.worker", "--spec-json", json.dumps(inst.spec.to_dict()),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log_file.close()
        inst.pid = proc.pid

        async def watch() -> None:
            await self._on_exit(inst, await proc.wait())

        self._task(watch())

    def _ready_timeout(self, inst: Instance) -> None:
        if inst.state == "starting" and not inst.exited.is_set():
            log.error("%s not ready after %.0fs: killing it", inst.instance_id,
                      self.settings.ready_timeout_s + inst.request.start_delay_s)
            inst.timed_out = True
            self._kill(inst)

    # -- workers --------------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        assert self.workers is not None
        while True:
            identity, *frames = await self.workers.recv_multipart()
            instance_id = identity.decode(errors="replace")
            inst = self.instances.get(instance_id)
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from worker %s: %s", instance_id, exc)
                continue
            if inst is None:
                log.warning("%s from unknown worker %s: dropped", type(msg).__name__, instance_id)
            elif isinstance(msg, InstanceReady):
                self._on_ready(inst, msg)
            elif isinstance(msg, SpawnFailed):
                inst.failure = msg.error
            elif isinstance(msg, InstanceStopped) and msg.reason == "failed":
                inst.sentinel_failed = True
            elif isinstance(msg, Pong):
                inst.last_pong = time.monotonic()
            else:
                log.warning("ignored %s from worker %s", type(msg).__name__, instance_id)

    async def _watch_workers(self) -> None:
        """Ping every ready worker each worker_ping_s; kill the ones whose loop stopped answering."""
        s = self.settings
        loop = asyncio.get_running_loop()
        seq = 0
        last_tick = loop.time()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), s.worker_ping_s)
            now = time.monotonic()
            lag = loop.time() - last_tick - s.worker_ping_s
            last_tick = loop.time()
            stalled = lag > s.hung_after_s / 2  # this loop was frozen: no worker is to blame
            if stalled:
                log.warning("daemon loop stalled for %.2fs: not judging workers this tick", lag)
            for inst in list(self.instances.values()):
                if inst.state != "ready" or inst.exited.is_set() or inst.hung:
                    continue
                if stalled:
                    inst.last_pong = now
                elif now - inst.last_pong > s.hung_after_s:
                    log.error("%s (pid %s) hung: no answer from its serving loop for %.2fs; killing it",
                              inst.instance_id, inst.pid, now - inst.last_pong)
                    inst.hung = True
                    self._kill(inst)
                    continue
                assert self.workers is not None
                _send_frames(self.workers, [inst.instance_id.encode(), *encode(Ping(seq))],
                             f"Ping to {inst.instance_id}")
            seq += 1

    def _on_ready(self, inst: Instance, msg: InstanceReady) -> None:
        if inst.state != "starting":
            return
        inst.state, inst.ready = "ready", msg
        self.init_gate.leave(inst.instance_id)
        inst.last_pong = time.monotonic()
        if inst.stop_reason is not None:  # asked to stop while starting: do it now
            self._stop(inst, inst.stop_reason)
        self._send(msg)

    def _stop(self, inst: Instance, reason: str) -> None:
        """Ask an instance to stop (SIGKILL after stop_grace_s); kill it at once if not ready."""
        if inst.exited.is_set():
            return
        inst.stop_reason = inst.stop_reason or reason
        if inst.ready is None:
            self._kill(inst)  # still starting: nothing to lose
            return
        inst.state = "stopping"
        assert self.workers is not None
        frames = [inst.instance_id.encode(), *encode(StopFunction(inst.instance_id, reason))]
        # ROUTER_MANDATORY: a worker that is gone fails the send, and is killed at once.
        _send_frames(self.workers, frames, f"StopFunction to {inst.instance_id}",
                     on_error=lambda exc: self._kill(inst))
        inst.timers.append(asyncio.get_running_loop().call_later(
            self.settings.stop_grace_s, self._kill, inst))

    def _kill(self, inst: Instance) -> None:
        if inst.pid and not inst.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(inst.pid, signal.SIGKILL)

    async def _on_exit(self, inst: Instance, exit_code: int, wait_gone: bool = False) -> None:
        """The worker process has ended (wait_gone: it is being killed, wait for that first)."""
        if inst.exited.is_set():
            return
        inst.exited.set()
        self.init_gate.leave(inst.instance_id)
        now = time.time()
        for timer in inst.timers:
            timer.cancel()
        if wait_gone and inst.pid:
            await _process_gone(inst.pid, timeout_s=2.0)
        oom_kills = self.cgroups.oom_kills(inst.limits)
        self.cgroups.remove(inst.limits)
        record = read_run_record(self.run_dir, inst.instance_id)
        self.instances.pop(inst.instance_id, None)
        node = self.settings.node
        if oom_kills:
            log.warning("%s: killed by its cgroup's OOM killer (memory_gb %.3f is too small for its "
                        "experts and calls; the allocator sizes functions)", inst.instance_id,
                        inst.request.memory_gb)
        if inst.ready is None and inst.stop_reason is None:
            self._send(SpawnFailed(inst.instance_id, node, self._spawn_error(inst, exit_code, oom_kills)))
            log.error("%s failed to start (exit %s)", inst.instance_id, exit_code)
            return
        if inst.sentinel_failed:
            reason = "failed"
        elif inst.stop_reason is not None:
            reason = inst.stop_reason
        elif exit_code == 0:
            reason = "idle"
        else:
            reason = "died"
        started_at = record.get("started_at") or (inst.ready.started_at if inst.ready else inst.spec.t0)
        stopped_at = record.get("stopped_at") if exit_code >= 0 else None
        stopped_at = stopped_at or now
        self._send(InstanceStopped(inst.instance_id, node, reason, started_at, stopped_at, exit_code))
        level = logging.WARNING if reason in ("died", "failed") else logging.INFO
        log.log(level, "%s stopped: %s (exit %s, up %.2fs)", inst.instance_id, reason, exit_code,
                stopped_at - started_at)

    def _spawn_error(self, inst: Instance, exit_code: int, oom_kills: int = 0) -> str:
        if inst.failure:
            return inst.failure
        if inst.timed_out:
            what = f"not ready within {self.settings.ready_timeout_s:.0f}s (killed)"
        elif exit_code < 0:
            what = f"killed by signal {-exit_code} before it was ready"
            if oom_kills:
                what += (f" by its cgroup's OOM killer: memory_gb {inst.request.memory_gb} does not hold "
                         "its experts' weights; give the function more memory")
        else:
            what = f"exited with code {exit_code} before it was ready"
        log_path = self.run_dir / f"{inst.instance_id}.log"
        try:
            tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        return f"worker {inst.instance_id} {what}; log {log_path}" + (
            ":\n" + "\n".join(tail) if tail else ""
        )


async def _process_gone(pid: int, timeout_s: float) -> bool:
    """Wait until process `pid` has exited (not necessarily reaped), up to timeout_s."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, AttributeError, OSError):
        return True
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(True))
    try:
        await asyncio.wait_for(gone, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _send_frames(
    sock: zmq.asyncio.Socket, frames: list, what: str, on_error: Callable[[BaseException], None] | None = None
) -> None:
    """Send without awaiting: a zmq.asyncio send reports failure in its future, logged here."""

    def done(future: asyncio.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("could not send %s: %s", what, exc)
            if on_error is not None:
                on_error(exc)

    sock.send_multipart(frames).add_done_callback(done)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--node", required=True, help="this node's name (a [[nodes]] entry)")
    parser.add_argument("--control", required=True, help="the coordinator's control endpoint")
    parser.add_argument("--config-json", required=True, help="MeshConfig.to_dict() as JSON")
    parser.add_argument("--run-dir", default=None, help="run records and worker logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    setup_logging(f"daemon {args.node}")
    from mesh.config import MeshConfig  # the config module is only needed by the CLI

    config = MeshConfig.from_dict(json.loads(args.config_json))
    run_dir = args.run_dir or tempfile.mkdtemp(prefix=f"moemesh-{args.node}-")
    settings = DaemonSettings.from_config(config, args.node, args.control, run_dir)
    # one daemon of this node under this coordinator on this host: an earlier one that lost its
    # ssh session but still runs is stopped before this one registers (held until we exit)
    lock = fence.take(args.node, args.control)  # noqa: F841 (the fd must stay open)
    return asyncio.run(NodeDaemon(settings).run())


if __name__ == "__main__":
    sys.exit(main())
