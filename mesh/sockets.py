"""One socket-option policy for every ZeroMQ socket of the mesh: size limits, queue bounds and
(through mesh.security) CURVE. Each site makes its socket and calls, before bind or connect:

    sock = context.socket(zmq.ROUTER)
    harden(sock, "client", config, bind=endpoint)       # or connect=endpoint

MAXMSGSIZE bounds one frame (ZeroMQ checks each frame's announced size before it reads it, and
drops the peer that sends a bigger one), so a socket never holds more than its role's largest
legitimate frame per part. Sized from the protocol's `Limits` and the config:

    role      sockets                                     largest frame                 default
    client    coordinator client ROUTER, SDK DEALER       a BIG_HEADER header           8 MiB
              (GenerateRequest, RequestDone, StatusReply)
    control   coordinator control ROUTER, daemon DEALER   a BIG_HEADER header           8 MiB
              (NodeHeartbeat)
    workers   daemon <-> worker (InstanceReady, ...)      any header (as control)       8 MiB
    metrics   PUB (receives subscriptions) / SUB          MetricsSnapshot header        8 MiB
              (receives snapshots)                                                      (PUB: 64 KiB)
    data      worker data ROUTER, executor DEALER         2 x payload cap + a header    12 MiB + 64 KiB
              (ExpertCall.x / ExpertResult.y)             (y may be float32 for a 16-bit x)

The data cap comes from `policy.payload_cap_bytes` (or an owner's `payload_cap_bytes`, as the
executor's ScatterSettings has); without either (a worker, which gets no policy) the decoder's
own bound `Limits.max_tensor_bytes` + a header is used. Never above the decoder's bound.

What MAXMSGSIZE does not bound: the number of frames in one multipart message (libzmq queues a
multipart whole before delivering it); the decoders refuse more than `Limits.max_frames`, and
CURVE + ZAP keep unknown peers out altogether.

High-water marks (messages queued per peer) are explicit per role: large enough that a normal
burst never drops (a ROUTER drops silently at its HWM), small enough to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from mesh import security

__all__ = ["ROLES", "SocketLimits", "harden", "limits_for"]


@dataclass(frozen=True)
class SocketLimits:
    """The options one socket gets: max_frame_bytes (ZMQ_MAXMSGSIZE), sndhwm, rcvhwm."""

    max_frame_bytes: int
    sndhwm: int
    rcvhwm: int


ROLES = ("client", "control", "workers", "metrics", "data")

# The decoders' bounds, mesh.protocol.DEFAULT_LIMITS (tests/mesh/test_security.py keeps them
# equal): not imported, so that light processes (mesh.echo, the dashboard) need not load torch.
MiB = 1024 * 1024
_HEADER = 64 * 1024  # Limits.max_header_bytes
_BIG_HEADER = 8 * MiB  # Limits.max_big_header_bytes
_TENSOR = 64 * MiB  # Limits.max_tensor_bytes
_HWM = {  # role -> (sndhwm, rcvhwm), in messages per peer
    "client": (100_000, 10_000),  # token events out to clients; requests in
    "control": (10_000, 10_000),
    "workers": (1_000, 1_000),
    "metrics": (8, 8),  # a slow dashboard drops snapshots, never slows the coordinator
    "data": (1_000, 1_000),  # calls in flight are bounded by the executor
}


def limits_for(role: str, owner: Any = None, *, server: bool = False) -> SocketLimits:
    """The limits of a socket of `role` (see the module table); owner: the MeshConfig, or an
    object with `payload_cap_bytes`, or None."""
    if role not in _HWM:
        raise ValueError(f"harden: unknown socket role {role!r}; roles: {', '.join(ROLES)}")
    sndhwm, rcvhwm = _HWM[role]
    if role == "data":
        frame = _data_frame_bytes(owner)
    elif role == "metrics" and server:
        frame = _HEADER  # a PUB only ever receives subscriptions
    else:
        frame = _BIG_HEADER
    return SocketLimits(frame, sndhwm, rcvhwm)


def _data_frame_bytes(owner: Any) -> int:
    cap = getattr(getattr(owner, "policy", None), "payload_cap_bytes", None)
    cap = cap if cap is not None else getattr(owner, "payload_cap_bytes", None)
    tensor_limit = _TENSOR
    if cap is None:
        return tensor_limit + _HEADER
    # A call carries at most `cap` bytes of x (one row more when a single row exceeds it); its
    # result y may come back as float32 for a 16-bit x. 1 MiB floor: one row of any model.
    return min(2 * max(int(cap), 1 * MiB), tensor_limit) + _HEADER


def harden(
    sock: zmq.Socket,
    role: str,
    config: Any = None,
    *,
    bind: str | None = None,
    connect: str | None = None,
    host: str | None = None,
) -> zmq.Socket:
    """Apply `role`'s limits and, where mesh.security says so, CURVE to `sock`; returns it.

    Call after creating the socket and before its bind (bind=endpoint) or connect
    (connect=endpoint); site-specific options set afterwards win. host: this process's host
    address, for a daemon's or worker's sockets (which host's key pair). Raises ConfigError when the [security] settings
    refuse the bind or lack keys.
    """
    limits = limits_for(role, config, server=bind is not None)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
    sock.setsockopt(zmq.SNDHWM, limits.sndhwm)
    sock.setsockopt(zmq.RCVHWM, limits.rcvhwm)
    security.secure(sock, role, config, bind=bind, connect=connect, host=host)
    return sock
