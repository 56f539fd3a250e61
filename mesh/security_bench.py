"""What CURVE costs: DEALER -> ROUTER echo throughput of 8 KiB frames on loopback, plain
against CURVE (+ ZAP), both set up by `mesh.sockets.harden` exactly as the mesh's sockets are.

    python -m mesh.security_bench [--frames 20000] [--size 8192] [--window 64]
    moemesh keys --bench

Prints one JSON line: frames per second and MB/s each way, and the ratio CURVE / plain. The
echo peer runs on its own thread (one process: the GIL is shared, as on a busy host), with at
most `window` frames in flight.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

import zmq

from mesh.config import SecurityConfig
from mesh.security import Setup, make_keys
from mesh.sockets import harden


def _echo(sock: zmq.Socket, frames: int) -> None:
    for _ in range(frames):
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def measure(setup: Setup, frames: int, size: int, window: int) -> dict[str, float]:
    """Round trips of `frames` frames of `size` bytes through an echo ROUTER under `setup`."""
    context = zmq.Context()
    server = context.socket(zmq.ROUTER)
    harden(server, "client", setup, bind="tcp://127.0.0.1:0")
    server.setsockopt(zmq.LINGER, 0)
    server.bind("tcp://127.0.0.1:0")
    endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
    client = context.socket(zmq.DEALER)
    harden(client, "client", setup, connect=endpoint)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(endpoint)
    payload = b"\x5a" * size
    client.send(payload)  # handshake and first round trip, outside the timing
    server.send_multipart(server.recv_multipart())
    client.recv()
    echo = threading.Thread(target=_echo, args=(server, frames), daemon=True)
    echo.start()
    start = time.perf_counter()
    sent = received = 0
    while received < frames:
        while sent < frames and sent - received < window:
            client.send(payload, copy=False)
            sent += 1
        client.recv(copy=False)
        received += 1
    seconds = time.perf_counter() - start
    echo.join()
    client.close(linger=0)
    server.close(linger=0)
    context.term()
    return {"seconds": seconds, "frames_per_s": frames / seconds, "mb_per_s": frames * size / seconds / 1e6}


def run(frames: int = 20000, size: int = 8192, window: int = 64) -> dict:
    """Plain vs CURVE on loopback (curve = "on"), same frames; the figures and their ratio."""
    with tempfile.TemporaryDirectory() as keys:
        for name in ("coordinator", "client"):
            make_keys(keys, name)
        plain = measure(Setup(SecurityConfig(curve="off")), frames, size, window)
        curve = measure(Setup(SecurityConfig(curve="on", keys_dir=keys)), frames, size, window)
    return {
        "frame_bytes": size, "frames": frames, "window": window,
        "plain": plain, "curve": curve,
        "curve_throughput_ratio": curve["frames_per_s"] / plain["frames_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.security_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--size", type=int, default=8192, help="frame bytes")
    parser.add_argument("--window", type=int, default=64, help="frames in flight")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.frames, args.size, args.window)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
