"""The mesh's wire protocol: every message, and how it is framed.

    frame 0   1 byte    MsgType
    frame 1   msgpack   header: the message's plain fields (+ "tensors": [{dtype, shape}, ...])
    frame 2+  raw       one zero-copy frame per tensor

    frames = encode(ExpertCall(call_id=7, layer=0, expert_ids=[3], counts=[n], x=x))
    sock.send_multipart(frames, copy=False)
    msg = decode(sock.recv_multipart(copy=False))      # -> ExpertCall, or a ProtocolError

`messages.py` holds every message (grouped by plane, with its MsgType byte); `wire.py` the
framing, the message registry and the tensor codec; `fields.py` the `Limits` every decoder
enforces and the field checks derived from type hints. The errors live with all the others in
`mesh.errors` and are re-exported here.
ROUTER sockets prepend identity frames: strip them before `decode`, prepend them after `encode`.
"""

from mesh.errors import (
    BadTensor,
    MalformedFrame,
    OversizedMessage,
    ProtocolError,
    UnknownMessageType,
)
from mesh.protocol.fields import DEFAULT_LIMITS, Limits, spec
from mesh.protocol.messages import (
    CancelRequest,
    ErrorReply,
    Expert,
    ExpertCall,
    ExpertResult,
    GenerateRequest,
    InstanceReady,
    InstanceStopped,
    MetricsSnapshot,
    MsgType,
    NodeHeartbeat,
    NodeRegister,
    Ping,
    Pong,
    RegisterAck,
    RequestDone,
    ShmRef,
    Shutdown,
    SpawnFailed,
    SpawnFunction,
    StatusReply,
    StatusRequest,
    StopFunction,
    TokenEvent,
    WorkerError,
    ZygoteExited,
    ZygoteForked,
    ZygoteReady,
    ZygoteSpawn,
    error_reply_for,
)
from mesh.protocol.wire import (
    DTYPES,
    FLOAT_DTYPES,
    Frame,
    Message,
    decode,
    encode,
    message,
    message_types,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPES",
    "FLOAT_DTYPES",
    "BadTensor",
    "CancelRequest",
    "ErrorReply",
    "Expert",
    "ExpertCall",
    "ExpertResult",
    "Frame",
    "GenerateRequest",
    "InstanceReady",
    "InstanceStopped",
    "Limits",
    "MalformedFrame",
    "Message",
    "MetricsSnapshot",
    "MsgType",
    "NodeHeartbeat",
    "NodeRegister",
    "OversizedMessage",
    "Ping",
    "Pong",
    "ProtocolError",
    "RegisterAck",
    "RequestDone",
    "ShmRef",
    "Shutdown",
    "SpawnFailed",
    "SpawnFunction",
    "StatusReply",
    "StatusRequest",
    "StopFunction",
    "TokenEvent",
    "UnknownMessageType",
    "WorkerError",
    "ZygoteExited",
    "ZygoteForked",
    "ZygoteReady",
    "ZygoteSpawn",
    "decode",
    "encode",
    "error_reply_for",
    "message",
    "message_types",
    "spec",
]
