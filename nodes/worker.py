"""One expert function instance: a process that serves some experts' MLPs over ZeroMQ.

    spawn ──► limits ──► weights ──► ready ──► serve ... idle keep_alive_s ──► exit 0
    (t0 ->     (join the   (its experts  (bind the data ROUTER, tell the daemon
     running)   cgroups,    only, from    InstanceReady with the four stage times)
                threads)    safetensors)

"spawn" runs from the daemon's receipt of SpawnFunction (t0) to `run_worker`'s first line:
the fork (or a fresh interpreter's start and imports), any start_delay_s, and, on a node whose
zygote is still warming up, the wait for it.

Started by its node daemon, either forked from the zygote (`nodes.zygote`, torch already
imported) or as a fresh interpreter:

    python -m nodes.worker --spec-json '{"instance_id": "fn0-0", ...}'     # WorkerSpec.to_dict()

Sockets (all with linger 0, except a last word to the daemon, which may wait 1 s):

    data ROUTER  bound on tcp://<host>:0   callers' DEALERs: ExpertCall -> ExpertResult,
                                           Ping -> Pong; errors as WorkerError / ErrorReply.
                                           A big call from this host may carry its rows in the
                                           caller's shared memory (ExpertCall.x_shm: a sealed
                                           memfd, mapped once, read zero-copy) and get y back
                                           in the same slot (mesh/shm.py)
    DEALER       identity = instance id,   -> daemon: InstanceReady, then a dead sentinel if it
                 connected to the daemon      fails (SpawnFailed before ready, InstanceStopped
                                              "failed" after); <- daemon: StopFunction, Ping

Liveness: the daemon pings every ready worker each 0.25 s and the serving loop below answers
Pong itself, so the Pong is the loop's own heartbeat: a frozen loop (SIGSTOP, a deadlock, a
call that never returns) goes silent while its sockets stay open, and the daemon kills it
after `hung_after_s` (nodes.daemon). A call's compute runs inline on this loop; a long one (a
Mixtral-sized expert takes 2.3 s for 64 rows on a core in bf16 here, longer at a fraction of a
vCPU) is computed in pieces of rows that each take about PIECE_S, and the daemon's Pings are
answered between pieces, so a busy loop still answers and a frozen one does not. The row time
starts from a pessimistic prior (the expert's flops at PRIOR_FLOPS x its CPU share) and is
measured on each piece; the bundled model's calls take milliseconds and are never split.

The serving loop is a plain synchronous `zmq.Poller` loop with torch computing inline on one
thread (DESIGN "Transport rules": a blocking loop beats asyncio on the hot path; STYLE's I/O
thread + queue adds a hand-off per call for nothing while a worker serves one call at a time). A frame that
cannot be decoded gets a typed answer and the loop goes on: `WorkerError(call_id, code)` when
the call id can be read from the header, else `ErrorReply(None, code)`; WorkerError's call_id
cannot be negative, so a call the worker cannot identify is answered with the one message made
for errors tied to no request.

Exit: 0 after `keep_alive_s` without a call (scale to zero), 0 soon after StopFunction, 0 if
its parent is gone (with SIGKILL from PR_SET_PDEATHSIG as the backstop), 2 on a fatal error
after sending the sentinel. `<run_dir>/<instance_id>.json` records pid, started_at (the
process's create time, `nodes.procs.process_start_time`) and, at exit, stopped_at: the
billed lifetime.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch
import zmq

from mesh.device import resolve_device
from mesh.errors import MeshError, ProtocolError
from mesh.protocol import (
    DEFAULT_LIMITS,
    ErrorReply,
    ExpertCall,
    ExpertResult,
    InstanceReady,
    InstanceStopped,
    MsgType,
    Ping,
    Pong,
    Shutdown,
    SpawnFailed,
    StopFunction,
    WorkerError,
    decode,
    encode,
)
from mesh.shm import ShmMaps
from mesh.sockets import harden
from nodes.limits import join
from nodes.model.checkpoint import Checkpoint
from nodes.model.layers import MLP
from nodes.procs import die_with_parent, process_start_time

log = logging.getLogger("nodes.worker")

EXIT_OK = 0
EXIT_FAILED = 2
SENTINEL_LINGER_MS = 1000  # how long a last word to the daemon may wait to be delivered
POLL_SLICE_S = 0.5  # longest poll: how soon a worker notices its parent is gone
PIECE_S = 0.5  # a long call is computed in row pieces of about this long, Pings answered between
PRIOR_FLOPS = 4e9  # a pessimistic core (bf16 matmuls here: 5-10 GFLOPS) for the row time before one is measured
DRAIN_BATCH = 64  # messages handled per socket per wake-up before the other socket's turn


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, set by its daemon (JSON-able: see to_dict / from_dict).

    experts:         (moe_layer, expert) pairs it serves
    memory_gb:       its memory limit (and what it is billed for); cpu_share: its vCPUs
    threads:         torch intra-op threads, set after the fork
    host:            address its data ROUTER binds (port 0, read back)
    daemon_endpoint: the daemon's worker ROUTER it reports to
    t0:              unix time the spawn was requested (start of the "spawn" stage)
    start_delay_s:   added to the spawn stage, to mimic a slower platform
    cgroup_procs:    cgroup.procs files to join (empty: none); cgroup: their limits read back
    cgroup_skipped:  why no cgroup is applied ("" if one is); cgroup_required: a failed join
                     is fatal (mode "require")
    parent_pid:      the parent the worker must die with (None: not checked)
    dtype:           the weights' dtype, the mesh's [model] dtype (as the coordinator loads its
                     own experts, so that remote and local experts compute alike)
    device:          where its experts compute: "cpu", or "cuda[:N]" (SpawnFunction.device, on a
                     node of kind "gpu"); weights move there in the "weights" stage
    """

    instance_id: str
    function_id: str
    node_id: str
    experts: tuple[tuple[int, int], ...]
    memory_gb: float
    cpu_share: float
    keep_alive_s: float
    model_path: str
    threads: int
    host: str
    daemon_endpoint: str
    run_dir: str
    t0: float
    start_delay_s: float = 0.0
    cgroup_procs: tuple[str, ...] = ()
    cgroup: dict | None = None
    cgroup_skipped: str = ""
    cgroup_required: bool = False
    parent_pid: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    security: dict | None = None  # mesh.security.bundle(config): CURVE keys of its data socket

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["experts"] = [list(e) for e in self.experts]
        out["cgroup_procs"] = list(self.cgroup_procs)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> WorkerSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"WorkerSpec: unknown fields {sorted(unknown)}")
        data = dict(data)
        data["experts"] = tuple((int(layer), int(expert)) for layer, expert in data["experts"])
        data["cgroup_procs"] = tuple(data.get("cgroup_procs", ()))
        if data.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"WorkerSpec.dtype: {data['dtype']!r}; expected float32, float16 or bfloat16")
        return cls(**data)


# ------------------------------------------------------------------------------- run record


class RunRecord:
    """`<run_dir>/<instance_id>.json`, rewritten atomically as the instance goes along."""

    def __init__(self, run_dir: str, instance_id: str) -> None:
        self.path = Path(run_dir) / f"{instance_id}.json"
        self.data: dict = {}

    def update(self, **fields: object) -> None:
        self.data.update(fields)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def read_run_record(run_dir: str | Path, instance_id: str) -> dict:
    """The run record of an instance ({} if missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / f"{instance_id}.json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------ worker


def run_worker(spec: WorkerSpec) -> int:
    """Start, serve until idle or stopped, and return the exit code (0 = clean)."""
    started_at = max(process_start_time(), spec.t0)  # ticks are 10 ms: never before the request
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    record = RunRecord(spec.run_dir, spec.instance_id)
    record.update(
        instance_id=spec.instance_id, function_id=spec.function_id, node_id=spec.node_id,
        pid=os.getpid(), started_at=started_at, memory_gb=spec.memory_gb,
        cpu_share=spec.cpu_share, experts=[list(e) for e in spec.experts],
    )
    context = zmq.Context()
    control = context.socket(zmq.DEALER)
    harden(control, "workers", spec, connect=spec.daemon_endpoint, host=spec.host)
    control.setsockopt(zmq.IDENTITY, spec.instance_id.encode())
    control.setsockopt(zmq.LINGER, 0)
    control.connect(spec.daemon_endpoint)
    data = server = None
    code, reason = EXIT_FAILED, "failed"
    try:
        try:
            data, experts, ready = _start(spec, context, record, started_at)
        except Exception as exc:
            log.exception("instance %s failed to start", spec.instance_id)
            _last_word(control, SpawnFailed(spec.instance_id, spec.node_id, _spawn_error(exc)))
            return code
        control.send_multipart(encode(ready))
        log.info("instance %s ready at %s: %s", spec.instance_id, ready.endpoint,
                 ", ".join(f"{k} {v:.3f}s" for k, v in ready.stages.items()))
        try:
            server = Server(spec, data, control, experts)
            reason = server.serve()
            code = EXIT_OK
        except Exception:
            log.exception("instance %s failed while serving", spec.instance_id)
            _last_word(control, InstanceStopped(
                spec.instance_id, spec.node_id, "failed", started_at, time.time(), EXIT_FAILED,
            ))
        return code
    finally:
        record.update(stopped_at=time.time(), exit_reason=reason, exit_code=code,
                      calls=server.calls if server else 0, busy_s=server.busy_s if server else 0.0)
        if data is not None:
            data.close(linger=0)
        control.close()
        context.term()


def _start(
    spec: WorkerSpec, context: zmq.Context, record: RunRecord, started_at: float
) -> tuple[zmq.Socket, dict[tuple[int, int], MLP], InstanceReady]:
    """The four cold-start stages; returns the bound data socket, the experts and the
    InstanceReady to send."""
    if spec.start_delay_s > 0:
        time.sleep(spec.start_delay_s)  # mimics a slower platform ([functions] start_delay_s)
    stages = {"spawn": max(0.0, time.time() - spec.t0)}

    t = time.perf_counter()
    cgroup, skipped = spec.cgroup, spec.cgroup_skipped
    if spec.cgroup_procs:
        try:
            join(spec.cgroup_procs)
        except OSError as exc:
            if spec.cgroup_required:
                raise
            cgroup, skipped = None, f"{exc}; set [functions] cgroups = \"off\" to skip limits"
            log.warning("instance %s runs without cgroup limits: %s", spec.instance_id, skipped)
    torch.set_num_threads(max(1, spec.threads))
    stages["limits"] = time.perf_counter() - t

    t = time.perf_counter()
    checkpoint = Checkpoint(spec.model_path, dtype=getattr(torch, spec.dtype))
    experts = checkpoint.load_experts(spec.experts)
    checkpoint.close()
    if spec.device != "cpu":  # a GPU function: its experts (and each call's rows) on the GPU
        device = resolve_device(spec.device, key="SpawnFunction.device")
        experts = {key: mlp.to(device) for key, mlp in experts.items()}
    stages["weights"] = time.perf_counter() - t

    t = time.perf_counter()
    data = context.socket(zmq.ROUTER)
    data.setsockopt(zmq.LINGER, 0)
    # A frame beyond the largest tensor the decoder accepts is refused by ZeroMQ itself (the
    # peer is disconnected) before it fills this process's memory.
    harden(data, "data", spec, bind=f"tcp://{spec.host}:0")  # MAXMSGSIZE, HWMs, CURVE off loopback
    data.bind(f"tcp://{spec.host}:0")
    endpoint = data.getsockopt_string(zmq.LAST_ENDPOINT)
    stages["ready"] = time.perf_counter() - t

    record.update(
        endpoint=endpoint, stages=stages, tensors_read=checkpoint.tensors_read,
        bytes_read=checkpoint.bytes_read, cgroup=cgroup, cgroup_skipped=skipped, device=spec.device,
    )
    ready = InstanceReady(
        instance_id=spec.instance_id, node_id=spec.node_id, endpoint=endpoint, pid=os.getpid(),
        started_at=started_at, stages=stages, cgroup=cgroup, cgroup_skipped=skipped,
    )
    return data, experts, ready


def _spawn_error(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        text += "; give the function more memory (SpawnFunction.memory_gb)"
    return text[: DEFAULT_LIMITS.max_str_len]


def _last_word(control: zmq.Socket, msg: InstanceStopped | SpawnFailed) -> None:
    """Send a dead sentinel to the daemon, waiting up to SENTINEL_LINGER_MS to deliver it."""
    try:
        control.setsockopt(zmq.LINGER, SENTINEL_LINGER_MS)
        control.send_multipart(encode(msg), flags=zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        log.error("could not tell the daemon: %s", exc)


class Server:
    """The serving loop: calls in, results out, until idle, stopped or orphaned."""

    def __init__(
        self,
        spec: WorkerSpec,
        data: zmq.Socket,
        control: zmq.Socket,
        experts: dict[tuple[int, int], MLP],
    ) -> None:
        self.spec = spec
        self.data = data
        self.control = control
        self.experts = experts
        self.hidden = next(iter(experts.values())).gate_proj.in_features if experts else None
        self.dtype = next(iter(experts.values())).gate_proj.weight.dtype if experts else torch.float32
        self.device = next(iter(experts.values())).gate_proj.weight.device if experts else torch.device("cpu")
        self.calls = 0
        self.busy_s = 0.0
        self.shm = ShmMaps()  # callers' shared-memory segments (big calls on this host: mesh/shm.py)
        # seconds per row of one expert: a pessimistic prior from its shape and CPU share (a
        # SwiGLU expert is 6 x hidden x width flops a row), then measured on the pieces of long calls
        width = next(iter(experts.values())).gate_proj.out_features if experts else 0
        share = spec.cpu_share if spec.cpu_share > 0 else 1.0
        self.row_s = 6.0 * (self.hidden or 0) * width / (PRIOR_FLOPS * min(share, spec.threads or 1))
        self._deferred: list[list[bytes]] = []  # daemon messages read between pieces, handled by the loop

    def serve(self) -> str:
        """Returns why it stopped: "idle", "requested" or "orphaned"."""
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        last_call = time.monotonic()
        while True:
            idle_left = self.spec.keep_alive_s - (time.monotonic() - last_call)
            if idle_left <= 0:
                log.info("instance %s idle for %.2fs after %d calls: scaling to zero",
                         self.spec.instance_id, self.spec.keep_alive_s, self.calls)
                return "idle"
            if self.spec.parent_pid is not None and os.getppid() != self.spec.parent_pid:
                log.warning("instance %s: parent %d is gone; exiting", self.spec.instance_id,
                            self.spec.parent_pid)
                return "orphaned"
            events = dict(poller.poll(int(min(idle_left, POLL_SLICE_S) * 1000) + 1))
            if not events and len(self.shm):
                self.shm.prune()  # unmap segments whose owner closed them (or died)
            if self.data in events:
                if self._drain_data():
                    last_call = time.monotonic()
            if self.control in events or self._deferred:
                stop = self._drain_control()
                if stop:
                    log.info("instance %s stopping: %s", self.spec.instance_id, stop)
                    return "requested"

    # -- data plane -------------------------------------------------------------------------

    def _drain_data(self) -> bool:
        """Handle queued data messages; True if any was a call."""
        called = False
        for _ in range(DRAIN_BATCH):
            try:
                parts = self.data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(parts) < 2:
                log.warning("dropped a data message without an identity envelope (%d frames)", len(parts))
                continue
            identity, frames = parts[0].bytes, parts[1:]
            reply, was_call = self._answer(frames)
            called |= was_call
            self.data.send_multipart([identity, *encode(reply)], copy=False)
        return called

    def _answer(self, frames: list) -> tuple[ExpertResult | WorkerError | ErrorReply | Pong, bool]:
        """The reply to one data message, and whether it was a call."""
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            call_id = _call_id_of(frames)
            log.warning("call %s: undecodable message (%s): %s", call_id, exc.code, exc.message)
            if call_id is None:
                return _error_reply(exc), False
            return WorkerError(call_id, exc.code, _clip(exc.message)), True
        if isinstance(msg, ExpertCall):
            self.calls += 1
            try:
                call = self.shm.resolve(msg)  # rows in the caller's shared memory: a zero-copy view
            except ProtocolError as exc:
                log.warning("call %d: %s", msg.call_id, exc.message)
                return WorkerError(msg.call_id, exc.code, _clip(exc.message)), True
            return self.shm.reply(call, self._call(call)), True  # y into the caller's slot, if it offered one
        if isinstance(msg, Ping):
            return Pong(msg.seq), False
        text = f"a worker's data socket takes ExpertCall or Ping, not {type(msg).__name__}"
        return ErrorReply(None, "protocol_error", text, "send control messages to the node daemon"), False

    def _call(self, call: ExpertCall) -> ExpertResult | WorkerError:
        missing = [e for e in call.expert_ids if (call.layer, e) not in self.experts]
        if missing:
            served = sorted(self.experts)
            return WorkerError(call.call_id, "unknown_expert", _clip(
                f"instance {self.spec.instance_id} does not serve experts {missing} of MoE layer "
                f"{call.layer}; it serves (layer, expert) {served}"
            ))
        x = call.x
        if x.shape[0] and self.hidden is not None and x.shape[1] != self.hidden:
            return WorkerError(call.call_id, "bad_tensor", _clip(
                f"ExpertCall.x: hidden size {x.shape[1]}; this model's is {self.hidden}"
            ))
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                y = self._compute(call.layer, call.expert_ids, call.counts, x)
            elapsed = time.perf_counter() - start
            self.busy_s += elapsed  # the function's own execution time: what invocation billing bills
            return ExpertResult(call.call_id, elapsed, y)
        except Exception as exc:  # a compute failure fails the call, not the instance
            log.exception("call %d failed", call.call_id)
            return WorkerError(call.call_id, "function_failed", _clip(f"{type(exc).__name__}: {exc}"))

    def _compute(self, layer: int, expert_ids: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
        """x [sum(counts), H] rows of each expert in turn -> y [sum(counts), H] in x's dtype, on the host."""
        cast = x.dtype != self.dtype or x.device != self.device
        if len(expert_ids) == 1 and self._short(x.shape[0]):  # the common call: no split, no gather
            rows = x.to(self.device, self.dtype) if cast else x
            y = self.experts[(layer, expert_ids[0])](rows)
            return (y.to(x.dtype).cpu() if cast else y).contiguous()  # .cpu(): waits for a GPU
        y = torch.empty_like(x)
        start = 0
        for expert, n in zip(expert_ids, counts, strict=True):
            mlp = self.experts[(layer, expert)]
            done = 0
            while done < n:
                piece = n - done if self._short(n - done) else self._piece_rows()
                rows = x[start + done:start + done + piece]
                began = time.perf_counter()
                out = mlp(rows.to(self.device, self.dtype) if cast else rows)
                y[start + done:start + done + piece] = out.to(x.dtype) if cast else out  # waits for a GPU
                self._timed(piece, time.perf_counter() - began)
                done += piece
                self._answer_pings()
            start += n
        return y

    def _short(self, rows: int) -> bool:
        """Whether `rows` rows of one expert compute within PIECE_S (the bundled model's always do,
        by the prior: a call is split only where it may be long, so results stay bit-identical)."""
        return rows * self.row_s <= PIECE_S

    def _piece_rows(self) -> int:
        return max(1, int(PIECE_S / self.row_s))

    def _timed(self, rows: int, seconds: float) -> None:
        """Learn the row time from a piece: a slower piece (throttled, or a pessimistic prior too
        low) counts at once, a faster one halves the gap, so the pieces grow toward PIECE_S."""
        per_row = seconds / rows
        self.row_s = per_row if per_row > self.row_s else 0.5 * (self.row_s + per_row)

    def _answer_pings(self) -> None:
        """Between the pieces of a long call: Pong the daemon's Pings (anything else waits for the loop).
        A Server made without a control socket (a test of its compute alone) has none to answer."""
        if self.control is None:
            return
        while self.control.poll(0):
            frames = self.control.recv_multipart(flags=zmq.NOBLOCK)
            msg = _from_daemon(frames)
            if isinstance(msg, Ping):
                self.control.send_multipart(encode(Pong(msg.seq)))
            elif msg is not None:
                self._deferred.append(frames)

    # -- control ------------------------------------------------------------------------------

    def _drain_control(self) -> str:
        """Handle the daemon's messages; the stop reason if one asked to stop, else ""."""
        for _ in range(DRAIN_BATCH):
            if self._deferred:  # read between the pieces of a long call
                frames = self._deferred.pop(0)
            else:
                try:
                    frames = self.control.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    return ""
            msg = _from_daemon(frames)
            if msg is None:
                continue
            if isinstance(msg, StopFunction | Shutdown):
                return msg.reason or type(msg).__name__
            if isinstance(msg, Ping):
                self.control.send_multipart(encode(Pong(msg.seq)))
            else:
                log.warning("ignored %s from the daemon", type(msg).__name__)
        return ""


def _from_daemon(frames: list):
    """A daemon message, or None (logged) where it does not decode."""
    try:
        return decode(frames)
    except ProtocolError as exc:
        log.warning("dropped an undecodable message from the daemon: %s", exc)
        return None


def _call_id_of(frames: list) -> int | None:
    """The call id of an ExpertCall whose message failed to decode, if its header still says."""
    try:
        if len(frames) < 2 or bytes(frames[0]) != bytes((MsgType.EXPERT_CALL,)):
            return None
        header_frame = frames[1].buffer if isinstance(frames[1], zmq.Frame) else frames[1]
        if len(header_frame) > DEFAULT_LIMITS.max_header_bytes:
            return None
        header = msgpack.unpackb(header_frame, raw=False, max_bin_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    call_id = header.get("call_id") if isinstance(header, dict) else None
    return call_id if type(call_id) is int and call_id >= 0 else None


def _error_reply(exc: ProtocolError) -> ErrorReply:
    return ErrorReply(None, exc.code, _clip(exc.message), _clip(exc.hint))


def _clip(text: str) -> str:
    return text[: DEFAULT_LIMITS.max_str_len]


# ------------------------------------------------------------------------------------------ CLI


def setup_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodes.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--spec-json", required=True, help="WorkerSpec.to_dict() as JSON")
    args = parser.parse_args(argv)
    spec = WorkerSpec.from_dict(json.loads(args.spec_json))
    setup_logging(f"worker {spec.instance_id}")
    die_with_parent(spec.parent_pid)
    return run_worker(spec)


if __name__ == "__main__":
    code = main()
    # Everything is closed already; skip the interpreter's teardown of torch (~1 s here), so
    # the process ends when its run record says it stopped.
    logging.shutdown()
    os._exit(code)
