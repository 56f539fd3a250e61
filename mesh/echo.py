"""A raw ZeroMQ echo peer: the baseline `moemesh bench` measures scatter-gather against.

Kept free of heavy imports (no torch) so that benchmark processes start in milliseconds.
"""

from __future__ import annotations

import zmq

from mesh.sockets import harden


def echo(endpoint_queue) -> None:
    """Bind a ROUTER on a free port, report it, echo every message until b"stop"."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    harden(sock, "data", bind="tcp://127.0.0.1:0")
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    endpoint_queue.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 2 and frames[1].bytes == b"stop":
            return
        sock.send_multipart(frames, copy=False)
