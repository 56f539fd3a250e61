"""Every message of the mesh, by plane. One frozen dataclass per message; the wire format is in
`wire.py`.

    client edge     client DEALER  <-> coordinator ROUTER      0x01-0x1f
    control plane   node DEALER    <-> coordinator ROUTER      0x20-0x3f
                    (DEALER identity = node id)
                    node daemon <-> its zygote (pipes)          0x29-0x2c
    data plane      coordinator DEALER <-> expert worker ROUTER 0x40-0x5f
    metrics         coordinator PUB -> subscribers             0x60-0x6f
    any socket      Ping / Pong                                0x70-0x7f

Units are in the field names (`_s` seconds, `_gb` gigabytes, `_at` unix time in seconds).
Fields without `spec(...)` bounds accept any value of their type (strings up to
`Limits.max_str_len`, lists up to `Limits.max_list_len`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from mesh.errors import BadTensor, MalformedFrame, MeshError
from mesh.protocol.fields import DEFAULT_LIMITS, spec
from mesh.protocol.wire import DTYPE_NAMES, FLOAT_DTYPES, Message, message

Expert = tuple[int, int]  # (moe_layer_index, expert_index)


class MsgType(enum.IntEnum):
    """The one-byte first frame of every message."""

    # client edge
    GENERATE_REQUEST = 0x01
    CANCEL_REQUEST = 0x02
    TOKEN_EVENT = 0x03
    REQUEST_DONE = 0x04
    ERROR_REPLY = 0x05
    STATUS_REQUEST = 0x06
    STATUS_REPLY = 0x07
    # control plane
    NODE_REGISTER = 0x20
    REGISTER_ACK = 0x21
    NODE_HEARTBEAT = 0x22
    SPAWN_FUNCTION = 0x23
    INSTANCE_READY = 0x24
    SPAWN_FAILED = 0x25
    STOP_FUNCTION = 0x26
    INSTANCE_STOPPED = 0x27
    SHUTDOWN = 0x28
    # node daemon <-> its zygote (the zygote's stdin/stdout; framing in nodes.procs)
    ZYGOTE_READY = 0x29
    ZYGOTE_SPAWN = 0x2A
    ZYGOTE_FORKED = 0x2B
    ZYGOTE_EXITED = 0x2C
    # data plane
    EXPERT_CALL = 0x40
    EXPERT_RESULT = 0x41
    WORKER_ERROR = 0x42
    # metrics
    METRICS_SNAPSHOT = 0x60
    # any socket
    PING = 0x70
    PONG = 0x71


# ------------------------------------------------------------------------------ client edge


@message
@dataclass(frozen=True, slots=True)
class GenerateRequest(Message):
    """Client -> coordinator: generate up to `max_new_tokens` tokens after `prompt`.

    temperature: 0 = greedy. top_p: nucleus sampling mass in (0, 1].
    seed:        sampling seed (None: the coordinator picks one and records it).
    slo_class:   a class of launch.toml [slo.classes]; "default" = slo.default_class.
    prompt_ids:  the prompt already tokenized; when given the coordinator uses it as is and
                 keeps `prompt` for the record.
    """

    TYPE = MsgType.GENERATE_REQUEST
    BIG_HEADER = True
    request_id: str
    prompt: str = spec(max_len="max_prompt_len")
    max_new_tokens: int = spec(ge=0)
    temperature: float = spec(0.0, ge=0.0)
    top_p: float = spec(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    slo_class: str = "default"
    stop_at_eos: bool = True
    prompt_ids: list[int] | None = spec(None, ge=0, max_len="max_prompt_tokens")


@message
@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    """Client -> coordinator: stop generating for `request_id` (answered by RequestDone)."""

    TYPE = MsgType.CANCEL_REQUEST
    request_id: str


@message
@dataclass(frozen=True, slots=True)
class TokenEvent(Message):
    """Coordinator -> client: the `index`-th generated token (0-based) and its decoded text."""

    TYPE = MsgType.TOKEN_EVENT
    request_id: str
    index: int = spec(ge=0)
    token_id: int = spec(ge=0)
    text: str


@message
@dataclass(frozen=True, slots=True)
class RequestDone(Message):
    """Coordinator -> client: the request finished.

    finish_reason: why it stopped, e.g. "eos", "length", "cancelled".
    ttft_s:        time to first token; tpot_s: mean time per output token after the first.
    record:        the meter's per-request record (billing, SLO verdict, stragglers), msgpack-able.
    """

    TYPE = MsgType.REQUEST_DONE
    BIG_HEADER = True
    request_id: str
    finish_reason: str
    prompt_tokens: int = spec(ge=0)
    generated_tokens: int = spec(ge=0)
    ttft_s: float = spec(ge=0.0)
    tpot_s: float = spec(ge=0.0)
    record: dict


@message
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """Any peer -> its caller: a typed error. `code` maps back to a MeshError class
    (mesh.errors.error_from_reply); `hint` says what to do. request_id None: not tied to one."""

    TYPE = MsgType.ERROR_REPLY
    request_id: str | None
    code: str
    message: str
    hint: str


@message
@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    """Client -> coordinator: ask for the cluster overview (`moemesh status`)."""

    TYPE = MsgType.STATUS_REQUEST


@message
@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    """Coordinator -> client: the cluster overview (nodes, instances, requests); schema owned
    by the coordinator."""

    TYPE = MsgType.STATUS_REPLY
    BIG_HEADER = True
    status: dict


# ---------------------------------------------------------------------------- control plane


@message
@dataclass(frozen=True, slots=True)
class NodeRegister(Message):
    """Node daemon -> coordinator, first message: who it is and what it can host.

    capacity_gb: memory the node offers to functions; cpus: vCPUs it offers.
    zygote:      True if it forks workers from a warm zygote (torch already imported).
    """

    TYPE = MsgType.NODE_REGISTER
    node_id: str
    kind: Literal["cpu", "gpu"]
    host: str
    capacity_gb: float = spec(gt=0.0)
    cpus: float = spec(gt=0.0)
    pid: int = spec(ge=0)
    zygote: bool


@message
@dataclass(frozen=True, slots=True)
class RegisterAck(Message):
    """Coordinator -> node: registered. Send a heartbeat every `heartbeat_interval_s`; a peer
    silent for `liveness` intervals is dead (Paranoid Pirate)."""

    TYPE = MsgType.REGISTER_ACK
    node_id: str
    heartbeat_interval_s: float = spec(gt=0.0)
    liveness: int = spec(ge=1)


@message
@dataclass(frozen=True, slots=True)
class NodeHeartbeat(Message):
    """Node -> coordinator, every heartbeat interval: free resources and live instances
    (schemas owned by the node daemon). `seq` counts up from 0."""

    TYPE = MsgType.NODE_HEARTBEAT
    BIG_HEADER = True
    node_id: str
    seq: int = spec(ge=0)
    resources: dict
    instances: list[dict]


@message
@dataclass(frozen=True, slots=True)
class SpawnFunction(Message):
    """Coordinator -> node: start one function instance serving `experts`.

    memory_gb:     memory limit (and what it is billed for); cpu_share: vCPUs (CFS quota).
    keep_alive_s:  idle time before it scales to zero.
    spawn:         "zygote" (fork a warm zygote) or "fresh" (new interpreter).
    model_path:    checkpoint directory the worker loads expert weights from.
    start_delay_s: added to the cold start to mimic a slower platform.
    device:        where its experts compute: "cpu", or "cuda" / "cuda:N" on a node of kind
                   "gpu" (default "cpu", so a sender that predates the field still decodes).
    """

    TYPE = MsgType.SPAWN_FUNCTION
    instance_id: str
    function_id: str
    experts: list[Expert] = spec(ge=0)
    memory_gb: float = spec(gt=0.0)
    cpu_share: float = spec(ge=0.0)
    keep_alive_s: float = spec(ge=0.0)
    spawn: Literal["zygote", "fresh"]
    model_path: str
    start_delay_s: float = spec(0.0, ge=0.0)
    device: str = "cpu"


@message
@dataclass(frozen=True, slots=True)
class InstanceReady(Message):
    """Node -> coordinator: the instance serves calls at `endpoint` (its data ROUTER).

    started_at:     unix time the spawn began.
    stages:         seconds per cold-start stage: "spawn", "limits", "weights", "ready".
    cgroup:         the limits applied, read back from the cgroup (None if none applied).
    cgroup_skipped: why no cgroup was applied ("" if it was).
    """

    TYPE = MsgType.INSTANCE_READY
    instance_id: str
    node_id: str
    endpoint: str
    pid: int = spec(ge=0)
    started_at: float
    stages: dict[str, float] = spec(ge=0.0)
    cgroup: dict | None
    cgroup_skipped: str


@message
@dataclass(frozen=True, slots=True)
class SpawnFailed(Message):
    """Node -> coordinator: the instance could not start; `error` says why."""

    TYPE = MsgType.SPAWN_FAILED
    instance_id: str
    node_id: str
    error: str


@message
@dataclass(frozen=True, slots=True)
class StopFunction(Message):
    """Coordinator -> node: stop one instance (answered by InstanceStopped)."""

    TYPE = MsgType.STOP_FUNCTION
    instance_id: str
    reason: str


@message
@dataclass(frozen=True, slots=True)
class InstanceStopped(Message):
    """Node -> coordinator: an instance ended; started_at / stopped_at (unix seconds) bound the
    billed lifetime. exit_code: the process's, None if unknown."""

    TYPE = MsgType.INSTANCE_STOPPED
    instance_id: str
    node_id: str
    reason: Literal["idle", "requested", "died", "failed", "shutdown"]
    started_at: float
    stopped_at: float
    exit_code: int | None


@message
@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """Coordinator -> node (or node -> its workers): stop everything and exit."""

    TYPE = MsgType.SHUTDOWN
    reason: str


# ------------------------------------------------------------------------------- data plane


class ShmRef(NamedTuple):
    """Where a [rows, cols] C-contiguous tensor lies in a caller's shared-memory segment on the
    same host (`mesh.shm`), sent as a msgpack array instead of a tensor frame.

    segment: the segment's name, "moemesh-<owner pid>-<32 hex digits>" (a sealed memfd)
    fd:      its descriptor in the owner's process (the peer opens /proc/<pid>/fd/<fd>)
    offset:  bytes from the segment's start (a multiple of the dtype's size)
    dtype:   a float wire dtype name; rows, cols: the tensor's shape
    """

    segment: str
    fd: int
    offset: int
    dtype: str
    rows: int
    cols: int


def _check_shm_ref(path: str, ref: ShmRef, like: torch.Tensor, rows: int | None) -> None:
    """ref describes a tensor of `like`'s dtype and columns (and `rows` rows, if given); a
    tensor that travels by ref has no rows in its frame (`rows` None: `like` is that frame)."""
    name = DTYPE_NAMES.get(like.dtype)
    if ref.dtype != name:
        raise BadTensor(f"{path}.dtype: {ref.dtype!r}; expected {name!r}, the frame's dtype", field=path)
    if ref.cols != like.shape[1]:
        raise BadTensor(f"{path}.cols: {ref.cols}; expected {like.shape[1]}, the frame's columns",
                        field=path)
    if rows is None and like.shape[0] != 0:
        raise BadTensor(f"{path}: set, but the tensor frame holds {like.shape[0]} rows; expected "
                        f"an empty [0, {ref.cols}] frame when the rows travel in shared memory",
                        field=path)
    if rows is not None and ref.rows != rows:
        raise BadTensor(f"{path}.rows: {ref.rows}; expected {rows}, one per counted token", field=path)


@message
@dataclass(frozen=True, slots=True, eq=False)  # eq=False: tensors have no truth value
class ExpertCall(Message):
    """Coordinator -> worker: run experts `expert_ids` of MoE layer `layer` on tokens `x`.

    x:      [sum(counts), hidden] activations, grouped contiguously by expert in the order of
            expert_ids: rows 0..counts[0]-1 go to expert_ids[0], the next counts[1] to
            expert_ids[1], and so on.
    counts: tokens per expert, len(counts) == len(expert_ids).
    x_shm:  set (same host only, `mesh.shm`): the rows lie in the caller's shared memory there,
            and x is an empty [0, hidden] frame of the same dtype. None: the rows are x.
    y_shm:  set: a [sum(counts), hidden] slot (same dtype) in the caller's shared memory where the
            worker may write y instead of a frame (it may be x_shm's own slot: y overwrites x).
    """

    TYPE = MsgType.EXPERT_CALL
    call_id: int = spec(ge=0)
    layer: int = spec(ge=0)
    expert_ids: list[int] = spec(ge=0)
    counts: list[int] = spec(ge=0)
    x: torch.Tensor = spec(dtypes=FLOAT_DTYPES, ndim=2)
    x_shm: ShmRef | None = spec(None, ge=0)
    y_shm: ShmRef | None = spec(None, ge=0)

    def _check(self) -> None:
        if len(self.counts) != len(self.expert_ids):
            raise MalformedFrame(
                f"ExpertCall.counts: {len(self.counts)} counts for {len(self.expert_ids)} "
                "expert_ids; expected one count per expert",
                field="ExpertCall.counts",
            )
        rows = self.x.shape[0]
        if self.x_shm is not None:
            _check_shm_ref("ExpertCall.x_shm", self.x_shm, self.x, None)
            rows = self.x_shm.rows
        if sum(self.counts) != rows:
            raise BadTensor(
                f"ExpertCall.x: {rows} rows but counts sum to {sum(self.counts)}; expected "
                "one row per counted token",
                field="ExpertCall.x",
            )
        if self.y_shm is not None:
            _check_shm_ref("ExpertCall.y_shm", self.y_shm, self.x, rows)


@message
@dataclass(frozen=True, slots=True, eq=False)
class ExpertResult(Message):
    """Worker -> coordinator: y = [n, hidden] unweighted expert outputs, rows in the order of
    the call's x. compute_s: seconds the worker spent computing (excludes transport).
    y_shm: set: y lies in the call's y_shm slot (this is that ref) and y is an empty [0, hidden]
    frame of the same dtype; None: the rows are y."""

    TYPE = MsgType.EXPERT_RESULT
    call_id: int = spec(ge=0)
    compute_s: float = spec(ge=0.0)
    y: torch.Tensor = spec(dtypes=FLOAT_DTYPES, ndim=2)
    y_shm: ShmRef | None = spec(None, ge=0)

    def _check(self) -> None:
        if self.y_shm is not None:
            _check_shm_ref("ExpertResult.y_shm", self.y_shm, self.y, None)


@message
@dataclass(frozen=True, slots=True)
class WorkerError(Message):
    """Worker -> coordinator: call `call_id` failed; `code` as in mesh.errors."""

    TYPE = MsgType.WORKER_ERROR
    call_id: int = spec(ge=0)
    code: str
    message: str


# ---------------------------------------------------------------------------------- metrics


@message
@dataclass(frozen=True, slots=True)
class MetricsSnapshot(Message):
    """Coordinator PUB: the meter's snapshot number `seq` at unix `time`; payload schema owned
    by the meter."""

    TYPE = MsgType.METRICS_SNAPSHOT
    BIG_HEADER = True
    seq: int = spec(ge=0)
    time: float
    payload: dict


# ------------------------------------------------------------------------------- any socket


@message
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Liveness probe on any socket; answered by Pong with the same seq."""

    TYPE = MsgType.PING
    seq: int = spec(ge=0)


@message
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to Ping(seq)."""

    TYPE = MsgType.PONG
    seq: int = spec(ge=0)


# ------------------------------------------------------------------------------------------


INTERNAL_ERROR_HINT = (
    "this is a bug in moemesh: please report it with the log of the peer that sent it"
)


def error_reply_for(exc: BaseException, request_id: str | None = None) -> ErrorReply:
    """The ErrorReply to send back for a caught exception.

    A MeshError keeps its code, message and hint; anything else is an "internal" error naming
    the exception. The message is clipped so that the reply always fits the default Limits.
    """
    if isinstance(exc, MeshError):
        code, text, hint = exc.code, exc.message, exc.hint
    else:
        code, text, hint = "internal", f"{type(exc).__name__}: {exc}", INTERNAL_ERROR_HINT
    limit = DEFAULT_LIMITS.max_str_len
    return ErrorReply(request_id, code[:limit], text[:limit], hint[:limit])


# ------------------------------------------------------- node daemon <-> its zygote (pipes)


@message
@dataclass(frozen=True, slots=True)
class ZygoteReady(Message):
    """Zygote -> its daemon, once: torch and the model code are imported and warmed (one
    thread). import_s: seconds the imports and the warm-up took."""

    TYPE = MsgType.ZYGOTE_READY
    pid: int = spec(ge=0)
    import_s: float = spec(ge=0.0)


@message
@dataclass(frozen=True, slots=True)
class ZygoteSpawn(Message):
    """Daemon -> its zygote: fork a worker. worker: nodes.worker.WorkerSpec.to_dict()."""

    TYPE = MsgType.ZYGOTE_SPAWN
    instance_id: str
    worker: dict


@message
@dataclass(frozen=True, slots=True)
class ZygoteForked(Message):
    """Zygote -> its daemon: the worker of `instance_id` runs as `pid`; pid 0 and `error`
    when the fork failed."""

    TYPE = MsgType.ZYGOTE_FORKED
    instance_id: str
    pid: int = spec(ge=0)
    error: str = ""


@message
@dataclass(frozen=True, slots=True)
class ZygoteExited(Message):
    """Zygote -> its daemon: a forked worker was reaped. exit_code: its exit status, None if
    a signal ended it; signal: that signal's number, None otherwise."""

    TYPE = MsgType.ZYGOTE_EXITED
    pid: int = spec(ge=0)
    exit_code: int | None
    signal: int | None
