"""Where shared memory beats ZeroMQ frames: expert-call round trips between two processes.

    python -m mesh.bench_shm                    # 4 KiB .. 16 MiB, writes docs/bench/shm.json
    python -m mesh.bench_shm --out - --budget-s 0.1

One round trip is what the executor and a worker do for one remote call, minus the maths:

    caller  x[span]: one expert's [n, 2048] bfloat16 rows, a contiguous span of a [2n, 2048] batch
              frames: ExpertCall with the span as a zero-copy frame (the executor's path today)
              shm:    the span copied into a ShmPool slot, ExpertCall with x_shm / y_shm
            -> tcp loopback (DEALER -> ROUTER) ->
    echo    decode; shm: maps.resolve (x a view on the slot); y = x.clone() (the expert's fresh
            output); shm: maps.reply (y copied into the slot); encode ExpertResult, send
            <- tcp loopback <-
    caller  decode; shm: pool.result; out[span] = y; shm: pool.release

Both ways run interleaved, in blocks of 5 round trips, on the same pair of processes (one torch
thread each), so drift and load hit both alike; each size reports the median wall time of its
round trips (and p10 / p90), and the CPU seconds per round trip of both processes together
(all threads, kernel time included: ZeroMQ's I/O threads and the tcp copies), which barely
moves with the host's load where the wall time does. The crossover is the smallest size from
which shared memory wins at every larger size measured (by median wall time; by p10 and by CPU
beside it). The echo is this
module run as `--echo ENDPOINT` (it connects to the caller's bound DEALER).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import zmq

from mesh.errors import ProtocolError
from mesh.protocol import (
    ExpertCall,
    ExpertResult,
    Ping,
    Pong,
    Shutdown,
    WorkerError,
    decode,
    encode,
)
from mesh.shm import KiB, MiB, ShmMaps, ShmPool
from mesh.sockets import harden

HIDDEN = 2048  # Qwen1.5-MoE-A2.7B's hidden size
DTYPE = torch.bfloat16
DEFAULT_OUT = Path("docs/bench/shm.json")
READY_TIMEOUT_S = 60.0  # the echo's interpreter imports torch first
REPLY_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------- echo


def echo(endpoint: str) -> int:
    """The worker's side: answer ExpertCalls with y = x (a fresh tensor), through shared memory
    when the call offers a slot; Ping with Pong; exit on Shutdown or when the parent is gone."""
    torch.set_num_threads(1)
    parent = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    harden(sock, "data", connect=endpoint)  # loopback: limits and HWMs, no CURVE
    sock.linger = 0
    sock.connect(endpoint)
    maps = ShmMaps()
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return 0
                continue
            identity, *frames = sock.recv_multipart(copy=False)
            try:
                msg = decode(frames)
                if isinstance(msg, Shutdown):
                    return 0
                if isinstance(msg, Ping):
                    reply = Pong(msg.seq)
                elif isinstance(msg, ExpertCall):
                    reply = _echo_call(maps, msg)
                else:
                    continue
            except ProtocolError as exc:
                reply = WorkerError(0, exc.code, exc.message[:1000])
            sock.send_multipart([identity, *encode(reply)], copy=False)
    finally:
        maps.close()
        sock.close()
        ctx.term()


def _echo_call(maps: ShmMaps, msg: ExpertCall) -> ExpertResult | WorkerError:
    try:
        call = maps.resolve(msg)
    except ProtocolError as exc:
        return WorkerError(msg.call_id, exc.code, exc.message[:1000])
    y = call.x.clone()  # stands in for the expert's output (a fresh [n, hidden] tensor)
    # compute_s carries this process's CPU seconds so far (all threads): the bench's CPU figures
    return maps.reply(call, ExpertResult(call.call_id, time.process_time(), y))


class Echo:
    """An echo process and the caller's DEALER bound to it (tcp loopback), as a context manager."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        harden(self.sock, "data", bind="tcp://127.0.0.1:0")
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.proc = subprocess.Popen([sys.executable, "-m", "mesh.bench_shm", "--echo", self.endpoint])
        self.send(Ping(1))
        reply = self.recv(READY_TIMEOUT_S)
        if not isinstance(reply, Pong):
            raise RuntimeError(f"echo answered {type(reply).__name__} to Ping")

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def recv(self, timeout_s: float = REPLY_TIMEOUT_S):
        if not self.sock.poll(int(timeout_s * 1000)):
            code = self.proc.poll()
            raise TimeoutError(f"no reply from the echo within {timeout_s} s (exit code {code})")
        return decode(self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(Shutdown("bench done"))
                self.proc.wait(timeout=10)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> Echo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ bench


class _Case:
    """One size: x [2n, hidden] (the round's batch) whose rows n..2n-1 are this call's (one
    expert's contiguous span, as the executor sends them), out [2n, hidden] (where replies land)."""

    def __init__(self, peer: Echo, pool: ShmPool, n: int, hidden: int, dtype: torch.dtype,
                 call_ids) -> None:
        self.peer, self.pool, self.n, self.call_ids = peer, pool, n, call_ids
        self.x = torch.randn(2 * n, hidden).to(dtype)
        self.span = slice(n, 2 * n)
        self.out = torch.zeros_like(self.x)

    def frames(self) -> float:
        """One round trip with the rows as frames (the span sent zero-copy, as the executor does);
        returns the echo's CPU seconds so far."""
        self.peer.send(ExpertCall(next(self.call_ids), 0, [0], [self.n], x=self.x[self.span]))
        msg = self.peer.recv()
        self.out[self.span] = msg.y
        return msg.compute_s

    def shm(self) -> float:
        """One round trip through shared memory (the span copied into a slot); returns the
        echo's CPU seconds so far."""
        call_id = next(self.call_ids)
        self.peer.send(self.pool.call(call_id, 0, [0], [self.n], self.x[self.span]))
        msg = self.peer.recv()
        self.out[self.span] = self.pool.result(msg)
        self.pool.release(call_id)
        return msg.compute_s


def _sizes(min_bytes: int, max_bytes: int) -> list[int]:
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def bench(min_bytes: int = 4 * KiB, max_bytes: int = 16 * MiB, budget_s: float = 0.4,
          hidden: int = HIDDEN, dtype: torch.dtype = DTYPE) -> dict:
    """Median round trip per size, frames vs shared memory (see the module docstring).

    budget_s: seconds of round trips per size and way (at least 20, at most 400 each)."""
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    row_bytes = hidden * dtype.itemsize
    rows_out: list[dict] = []
    call_ids = iter(range(1, 1 << 62))
    try:
        with Echo() as peer, ShmPool("echo", max_bytes=64 * MiB, min_call_bytes=0) as pool:
            for size in _sizes(min_bytes, max_bytes):
                n = max(1, size // row_bytes)
                case = _Case(peer, pool, n, hidden, dtype, call_ids)
                frames_trip, shm_trip = case.frames, case.shm
                for trip in (frames_trip, shm_trip):  # warm up, and check the rows came back
                    case.out.zero_()
                    for _ in range(3):
                        trip()
                    if not torch.equal(case.out[case.span], case.x[case.span]):
                        raise RuntimeError(f"{trip.__name__}: wrong rows back at {size} bytes")
                start = time.perf_counter()
                frames_trip()
                shm_trip()
                reps = int(min(400, max(20, budget_s / max(1e-6, time.perf_counter() - start))))
                rows_out.append(_measure(n * row_bytes, n, reps, frames_trip, shm_trip))
            pool_stats = vars(pool.stats) | {}
    finally:
        torch.set_num_threads(threads)
    return {
        "what": "median expert-call round trip between two processes on one host: ZeroMQ tcp "
                "loopback frames (today) vs mesh.shm descriptors; see mesh/bench_shm.py",
        "hidden": hidden, "dtype": str(dtype).removeprefix("torch."),
        "host": {"cpus": os.cpu_count(), "loadavg_1m_before": load_before,
                 "loadavg_1m_after": os.getloadavg()[0], "torch_threads": 1},
        "sizes": rows_out,
        "crossover_bytes": crossover(rows_out),
        "crossover_p10_bytes": crossover(rows_out, "p10"),
        "crossover_cpu_bytes": crossover(rows_out, "cpu"),
        "first_win_bytes": next((r["bytes"] for r in rows_out if r["shm_median_s"] < r["frames_median_s"]), None),
        "pool": pool_stats,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


BLOCK = 5  # round trips of one way in a row, the two ways alternating block by block


def _measure(nbytes: int, n: int, reps: int, frames_trip, shm_trip) -> dict:
    """Wall time per round trip (each timed), and CPU seconds per round trip of both processes
    together (all threads: ZeroMQ's I/O threads and the kernel's copies included), per block
    of BLOCK trips: the CPU figure barely moves with the host's load, the wall time does."""
    wall: dict[str, list[float]] = {"frames": [], "shm": []}
    cpu: dict[str, list[float]] = {"frames": [], "shm": []}
    echo_cpu = frames_trip()
    for _ in range(max(1, reps // BLOCK)):
        for way, trip in (("frames", frames_trip), ("shm", shm_trip)):
            echo_start, own_start = echo_cpu, time.process_time()
            for _ in range(BLOCK):
                t = time.perf_counter()
                echo_cpu = trip()
                wall[way].append(time.perf_counter() - t)
            cpu[way].append((time.process_time() - own_start + echo_cpu - echo_start) / BLOCK)
    frames_s, shm_s = statistics.median(wall["frames"]), statistics.median(wall["shm"])
    return {
        "bytes": nbytes, "rows": n, "reps": len(wall["frames"]),
        "frames_median_s": frames_s, "shm_median_s": shm_s,
        "frames_p10_s": _quantile(wall["frames"], 0.1), "shm_p10_s": _quantile(wall["shm"], 0.1),
        "frames_p90_s": _quantile(wall["frames"], 0.9), "shm_p90_s": _quantile(wall["shm"], 0.9),
        "frames_cpu_s": statistics.median(cpu["frames"]), "shm_cpu_s": statistics.median(cpu["shm"]),
        "shm_over_frames": shm_s / frames_s,
        "frames_gb_per_s": 2 * nbytes / frames_s / 1e9,  # both ways
        "shm_gb_per_s": 2 * nbytes / shm_s / 1e9,
    }


def crossover(rows: list[dict], stat: str = "median") -> int | None:
    """The smallest size from which shared memory wins at every larger size (None: never), by
    the median round trip, or by another statistic the rows carry ("p10", "cpu": CPU seconds of
    both processes, robust to the host's load)."""
    best = None
    for row in reversed(rows):
        if row[f"shm_{stat}_s"] >= row[f"frames_{stat}_s"]:
            break
        best = row["bytes"]
    return best


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _table(result: dict) -> str:
    lines = [f"{'bytes':>10} {'rows':>5} {'frames ms':>10} {'shm ms':>8} {'shm/frames':>10}"
             f" {'p10 frames':>10} {'p10 shm':>8} {'cpu frames':>10} {'cpu shm':>8}"]
    for r in result["sizes"]:
        lines.append(f"{r['bytes']:>10} {r['rows']:>5} {r['frames_median_s'] * 1e3:>10.3f} "
                     f"{r['shm_median_s'] * 1e3:>8.3f} {r['shm_over_frames']:>10.2f} "
                     f"{r['frames_p10_s'] * 1e3:>10.3f} {r['shm_p10_s'] * 1e3:>8.3f} "
                     f"{r['frames_cpu_s'] * 1e3:>10.3f} {r['shm_cpu_s'] * 1e3:>8.3f}")
    lines.append(f"crossover (median): {result['crossover_bytes']} bytes, (p10): "
                 f"{result['crossover_p10_bytes']} bytes, (cpu): {result['crossover_cpu_bytes']} bytes; "
                 f"first median win at {result['first_win_bytes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.bench_shm", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path, or - for stdout only")
    parser.add_argument("--min-bytes", type=int, default=4 * KiB)
    parser.add_argument("--max-bytes", type=int, default=16 * MiB)
    parser.add_argument("--budget-s", type=float, default=0.4, help="seconds per size and way")
    parser.add_argument("--echo", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the echo process
    args = parser.parse_args(argv)
    if args.echo:
        return echo(args.echo)
    result = bench(args.min_bytes, args.max_bytes, args.budget_s)
    print(_table(result))
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
