"""Process plumbing shared by the daemon, the zygote and workers: dying with the parent, and
mesh messages over a pipe.

Orphan safety (no worker outlives its node): every child asks the kernel for SIGKILL when its
parent dies (`prctl(PR_SET_PDEATHSIG)`), then checks that the parent it expected is still
there (it may have died before the prctl). The chain daemon -> zygote -> worker (or daemon ->
fresh worker) so takes everything down when the daemon is killed, even by `kill -9`.

Pipe framing (daemon <-> zygote over the zygote's stdin/stdout), one mesh message at a time:

    u32 frame count, then per frame: u32 length, bytes          (big-endian)

the frames being `mesh.protocol.encode(msg)`; the reader bounds counts and lengths before it
reads, then `decode` checks the message as on any socket.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import struct
import sys
import time
from typing import BinaryIO

import psutil

from mesh.errors import MalformedFrame, OversizedMessage
from mesh.protocol import Message, decode, encode

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_PIPE_FRAMES = 16
MAX_PIPE_FRAME_BYTES = 1 << 20  # pipe messages are control messages: small headers, no tensors
_U32 = struct.Struct(">I")


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has (Linux only).

    expected_parent: the parent's pid as the parent knew it (None: skip the check).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if expected_parent is not None and os.getppid() != expected_parent:
        log.error("parent %d is gone before start; exiting", expected_parent)
        os._exit(1)


def process_start_time(pid: int | None = None) -> float:
    """Unix time at which process `pid` (default: this one) was created, to a clock tick (10 ms).

    psutil's `create_time()` adds the start tick to the boot time of /proc/stat, which is whole
    seconds: it reads up to 1 s early, before the spawn that created the process. The kernel
    counts a process's start in ticks of CLOCK_BOOTTIME, so we compare it with that clock.
    """
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after "pid (comm)"
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - since_start
    except (OSError, ValueError, IndexError, AttributeError):
        return psutil.Process(pid).create_time()


def pack(msg: Message) -> bytes:
    """One message as pipe bytes."""
    frames = [bytes(f) for f in encode(msg)]
    parts = [_U32.pack(len(frames))]
    for frame in frames:
        parts += [_U32.pack(len(frame)), frame]
    return b"".join(parts)


def write_message(stream: BinaryIO, msg: Message) -> None:
    """Write one message to a blocking binary stream and flush it."""
    stream.write(pack(msg))
    stream.flush()


def _check_count(count: int) -> int:
    if not 1 <= count <= MAX_PIPE_FRAMES:
        raise OversizedMessage(f"pipe message of {count} frames; expected 1..{MAX_PIPE_FRAMES}")
    return count


def _check_length(length: int) -> int:
    if length > MAX_PIPE_FRAME_BYTES:
        raise OversizedMessage(
            f"pipe frame of {length} bytes; at most {MAX_PIPE_FRAME_BYTES} (nodes.procs.MAX_PIPE_FRAME_BYTES)"
        )
    return length


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            if data:
                raise MalformedFrame(f"pipe closed inside a message ({len(data)} of {n} bytes)")
            return None
        data += chunk
    return data


def read_message(stream: BinaryIO) -> Message | None:
    """The next message from a blocking binary stream; None at end of stream.

    Raises a ProtocolError for a message that cannot be read (the stream is then unusable).
    """
    head = _read_exact(stream, 4)
    if head is None:
        return None
    frames = []
    for _ in range(_check_count(_U32.unpack(head)[0])):
        size = _read_exact(stream, 4)
        length = _check_length(_U32.unpack(size)[0]) if size is not None else None
        frame = _read_exact(stream, length) if length else b""
        if size is None or frame is None:
            raise MalformedFrame("pipe closed inside a message")
        frames.append(frame)
    return decode(frames)


async def read_message_async(reader: asyncio.StreamReader) -> Message | None:
    """The next message from an asyncio stream; None at end of stream."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise MalformedFrame("pipe closed inside a message") from None
        return None
    frames = []
    try:
        for _ in range(_check_count(_U32.unpack(head)[0])):
            length = _check_length(_U32.unpack(await reader.readexactly(4))[0])
            frames.append(await reader.readexactly(length) if length else b"")
    except asyncio.IncompleteReadError:
        raise MalformedFrame("pipe closed inside a message") from None
    return decode(frames)
