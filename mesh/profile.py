"""`moemesh profile`: measure expert functions on this host and store the allocator's profiles.

    moemesh profile [--model bundled] [--memory 0.25,0.5,1,2] [--tokens 1,4,16,64] [--calls 50]
                    [--period-us 10000 --period-us-compare 100000] [--out profiles/] [--host NAME]

Real function instances: a real node daemon (`python -m nodes.daemon`, its zygote, its cgroups)
is started with this module playing the coordinator's control ROUTER (register, ping, spawn,
stop), and the expert calls go straight to each worker's data socket, as the coordinator's.

1. Latency vs memory: one function per memory size (CPU share = memory_gb / gb_per_vcpu, a CFS
   quota per `--period-us`) serving one expert; `--calls` back-to-back calls of each token
   count, the counts interleaved, in --rounds rounds that each visit every size (a burst of
   other work on the host then hits a few rounds of every size, not all of one). Per point:
   round trip and the worker's compute_s (median, p90, mean). The fitted quantity is the
   *expert time*: the median over rounds of the round's mean round trip, minus the transport
   overhead of that call size (below), i.e. all the time that depends on the function's size.
   Means, not medians, within a round: the CPU quota shows up as stalls (a throttled worker
   waits for the next CFS period), which a median of short calls never sees, and the allocator
   wants expected seconds; the cgroup's own throttling counters are reported beside them.
   Remoe's `a*exp(-b*y)+c` and the hyperbola `a + b/y` are both fitted (allocator.profiles,
   memory capped at --saturation-gb, default threads_per_function x gb_per_vcpu: a worker
   computes on that many threads); the one with the smaller residual standard error is stored
   unless --family picks one.
2. Scatter-gather: round trip minus compute_s (median) at the sizes at or above saturation
   (never throttled) against the bytes of a call (activations sent + received): a linear fit.
3. Cold start: functions holding 1, 2, 4, 16 experts (--cold-experts) spawned --cold-repeats times;
   seconds from SpawnFunction to InstanceReady against the weight bytes the worker read, plus
   the worker's own stage times (spawn, limits, weights, ready): a linear fit.
4. CFS period: the same small call (--period-tokens) at --period-memory (0.25 GB = 25 % of a
   vCPU) for --period-seconds of back-to-back calls, under --period-us and under
   --period-us-compare (a second daemon): median, p90, p99, max.

Writes `<out>/<host>/<model>.json` (allocator.profiles.Profiles JSON, plus a "measurement"
section with every point; `Profiles.from_json` reads it), `<model>-fits.png` (both fits against
the measured points) and `<model>-period.png` next to it; prints the tables. Where cgroups are
not writable it still runs, with the CPU share unenforced, and says so in the output and the
JSON ("cgroups": {"enforced": false, ...}). `mesh.planning.profiles_of` loads the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zmq
from scipy.optimize import OptimizeWarning

from allocator.profiles import (
    FAMILIES,
    FitReport,
    LinearModel,
    Profiles,
    fit_expert_latency,
    fit_linear,
    plot_fits,
)
from mesh import planning
from mesh.config import MeshConfig, load_config
from mesh.errors import MeshError, ProtocolError
from mesh.profile_store import DEFAULT_OUT, default_host, profile_path
from mesh.protocol import (
    ExpertCall,
    ExpertResult,
    InstanceReady,
    InstanceStopped,
    NodeHeartbeat,
    NodeRegister,
    Ping,
    RegisterAck,
    Shutdown,
    SpawnFailed,
    SpawnFunction,
    StopFunction,
    decode,
    encode,
)
from mesh.sockets import harden
from nodes.limits import Cgroups
from nodes.model.config import MoEConfig
from nodes.procs import die_with_parent
from nodes.worker import read_run_record

HEARTBEAT_S = 0.5
LIVENESS = 20  # 10 s of silence before the daemon reconnects: never during a measurement
READY_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 30.0
WARMUP_CALLS = 3
MEASURED = ("expert", "scatter_gather", "cold_start")
ASSUMED = ("gpu_expert", "dense", "main_cold_start", "runtime_gb")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _stats(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(np.mean(a)), "max": float(np.max(a)),
            "n": int(a.size)}


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.step, self.quiet = total, 0, quiet

    def show(self, what: str, advance: int = 0) -> None:
        self.step = min(self.total, self.step + advance)
        if self.quiet:
            return
        bar = "#" * int(30 * self.step / self.total)
        print(f"\r[{bar:<30}] {self.step}/{self.total} {what:<52.52}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.step = self.total
        self.show("done")
        if not self.quiet:
            print(file=sys.stderr)


# ------------------------------------------------------------------------ the control plane


class ControlPlane(threading.Thread):
    """The coordinator's control ROUTER for one node: acknowledges the registration, pings the
    node, sends what it is given and keeps every other message for `wait_for`."""

    def __init__(self, node: str) -> None:
        super().__init__(daemon=True, name=f"control-{node}")
        self.node = node
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        harden(self.sock, "control", bind="tcp://127.0.0.1:0")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # send() pushes from the caller's thread; the control thread forwards at once (a poll
        # timeout would add up to its length to every spawn this module times).
        inbox = f"inproc://control-{uuid.uuid4().hex}"
        self.outbox = self.context.socket(zmq.PULL)
        self.outbox.bind(inbox)
        self.pusher = self.context.socket(zmq.PUSH)
        self.pusher.setsockopt(zmq.LINGER, 0)
        self.pusher.connect(inbox)
        self.messages: list = []
        self.cond = threading.Condition()
        self.stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
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
                        self._send(encode(RegisterAck(self.node, HEARTBEAT_S, LIVENESS)))
                    if msg is not None:
                        with self.cond:
                            self.messages.append(msg)
                            self.cond.notify_all()
                if self.outbox in events:
                    self._send(self.outbox.recv_multipart())
                if time.monotonic() >= next_ping:
                    self._send(encode(Ping(seq)))
                    seq, next_ping = seq + 1, time.monotonic() + HEARTBEAT_S
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


class Node:
    """A real node daemon (`python -m nodes.daemon`) with its own control plane; a context manager."""

    def __init__(self, config, model_path: Path, period_us: int, run_dir: Path, tag: str) -> None:
        self.name = f"profile{tag}-{uuid.uuid4().hex[:6]}"
        self.model_path = model_path
        self.run_dir = run_dir
        self.spawn_how = config.functions.spawn
        data = config.to_dict()
        data["hosts"] = [{"name": "local", "address": "127.0.0.1"}]
        data["nodes"] = [{"name": self.name, "host": "local", "kind": "cpu", "capacity_gb": 64.0,
                          "cpus": float(os.cpu_count() or 1)}]
        data["functions"] = {**data["functions"], "cfs_period_us": int(period_us)}
        data["coordinator"] = {**data["coordinator"], "heartbeat_s": HEARTBEAT_S, "liveness": LIVENESS}
        self.config = MeshConfig.from_dict(data)
        self.control = ControlPlane(self.name)
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

    def spawn(self, experts: list[tuple[int, int]], memory_gb: float, cpu_share: float):
        """Start a function and wait until it serves: (InstanceReady, seconds from request to ready)."""
        self.seq += 1
        instance_id = f"{self.name}-{self.seq}"
        start = time.perf_counter()
        self.control.send(SpawnFunction(
            instance_id=instance_id, function_id=f"profile-{self.seq}", experts=[list(e) for e in experts],
            memory_gb=memory_gb, cpu_share=cpu_share, keep_alive_s=600.0, spawn=self.spawn_how,
            model_path=str(self.model_path),
        ))
        msg = self.wait(lambda m: isinstance(m, InstanceReady | SpawnFailed)
                        and m.instance_id == instance_id)
        elapsed = time.perf_counter() - start
        if isinstance(msg, SpawnFailed):
            raise MeshError(f"spawn of {instance_id} ({memory_gb} GB) failed: {msg.error}",
                            code="function_failed", hint="give the functions more memory (--memory)")
        return msg, elapsed

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
        cgroups = Cgroups(self.name, self.config.functions.cgroups)  # in case it was killed
        cgroups.sweep()
        cgroups.close()


# ------------------------------------------------------------------------------ the caller


class Caller:
    """A DEALER on one worker's data socket: timed ExpertCalls, one at a time."""

    def __init__(self, endpoint: str, hidden: int, dtype) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        harden(self.sock, "data", connect=endpoint)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.hidden = hidden
        self.inputs: dict[int, object] = {}
        self.generator = torch.Generator().manual_seed(0)
        self.dtype = dtype
        self.call_id = 0

    def call(self, layer: int, expert: int, tokens: int) -> tuple[float, float]:
        """(round trip seconds, the worker's compute_s) of one call on `tokens` rows."""
        x = self.inputs.get(tokens)
        if x is None:
            x = self.inputs[tokens] = torch.randn(tokens, self.hidden, generator=self.generator).to(self.dtype)
        self.call_id += 1
        start = time.perf_counter()
        self.sock.send_multipart(encode(ExpertCall(self.call_id, layer, [expert], [tokens], x)), copy=False)
        if not self.sock.poll(CALL_TIMEOUT_S * 1000):
            raise MeshError(f"no answer from {self.endpoint} within {CALL_TIMEOUT_S:.0f}s", code="timeout",
                            hint="the host may be overloaded; see the worker's log")
        reply = decode(self.sock.recv_multipart())
        elapsed = time.perf_counter() - start
        if not isinstance(reply, ExpertResult) or reply.call_id != self.call_id:
            raise MeshError(f"the worker answered {reply!r} to call {self.call_id}", code="function_failed",
                            hint="see the worker's log")
        return elapsed, reply.compute_s

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


# ----------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Settings:
    model: str | None = None  # None: the config's [model] path ("bundled" by default)
    memory: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    tokens: tuple[int, ...] = (1, 4, 16, 64)
    calls: int = 50
    rounds: int = 10
    period_us: int | None = None  # None: the config's [functions] cfs_period_us
    period_us_compare: int = 100_000
    period_memory: float = 0.25
    period_tokens: int = 1
    period_seconds: float = 2.0
    cold_experts: tuple[int, ...] = (1, 2, 4, 16)
    cold_repeats: int = 3
    cold_memory: float = 1.0
    saturation_gb: float | None = None  # None: threads_per_function * gb_per_vcpu
    family: str = "best"
    out: Path = DEFAULT_OUT
    host: str = ""
    config: str | None = None
    quiet: bool = False


def _cgroup_state(ready) -> dict:
    values = ready.cgroup or {}
    return {"enforced": "cpu_quota_us" in values, "memory_enforced": "memory_limit_bytes" in values,
            "skipped": ready.cgroup_skipped, "values": {k: v for k, v in values.items() if not k.endswith("_path")}}


def _cpu_stat(ready) -> dict[str, int]:
    """The instance's cgroup cpu.stat (nr_periods, nr_throttled, throttled_time ns); {} if none."""
    path = (ready.cgroup or {}).get("cpu_path")
    if not path:
        return {}
    try:
        return {k: int(v) for k, v in (line.split() for line in Path(path, "cpu.stat").read_text().splitlines())
                if k in ("nr_periods", "nr_throttled", "throttled_time")}
    except (OSError, ValueError):
        return {}


def _throttling(before: dict, after: dict) -> dict:
    """What the CFS quota did between two cpu.stat reads (empty without a cgroup)."""
    if not before or not after:
        return {}
    periods = after["nr_periods"] - before["nr_periods"]
    throttled = after["nr_throttled"] - before["nr_throttled"]
    return {"periods": periods, "throttled_periods": throttled,
            "throttled_s": (after["throttled_time"] - before["throttled_time"]) / 1e9}


def _sweep(node: Node, s: Settings, memory_sizes, token_counts, hidden: int, dtype, gb_per_vcpu: float,
           progress: Progress):
    """Latency vs (memory, tokens): one function per size, all warm at once.

    The calls go in rounds; each round visits every size in turn with `calls / rounds` calls of
    every token count (interleaved), so a burst of other work on the host lands in a few rounds
    of every size instead of all of one size. Per point: every call's round trip and compute_s,
    and each round's mean round trip (the fit takes the median of those means)."""
    rounds = max(1, min(s.rounds, s.calls))
    per_round = math.ceil(s.calls / rounds)
    samples = {(m, t): {"round_trip_s": [], "compute_s": [], "round_means_s": []}
               for m in memory_sizes for t in token_counts}
    functions, cgroups = [], {}
    try:
        for memory in memory_sizes:
            progress.show(f"latency: spawning a {memory:g} GB function")
            ready, _ = node.spawn([(0, 0)], memory, memory / gb_per_vcpu)
            functions.append((memory, ready, Caller(ready.endpoint, hidden, dtype)))
            cgroups[memory] = {"memory_gb": memory, **_cgroup_state(ready), "throttling": {}}
        for _, _, caller in functions:
            for tokens in token_counts:
                for _ in range(WARMUP_CALLS):
                    caller.call(0, 0, tokens)
        progress.show("", advance=1)
        for r in range(rounds):
            progress.show(f"latency: round {r + 1}/{rounds}, {len(functions)} sizes")
            for memory, ready, caller in functions:
                n = min(per_round, s.calls - r * per_round)
                if n <= 0:
                    continue
                before = _cpu_stat(ready)
                times: dict[int, list[float]] = {t: [] for t in token_counts}
                for _ in range(n):
                    for tokens in token_counts:
                        rt, compute = caller.call(0, 0, tokens)
                        times[tokens].append(rt)
                        samples[(memory, tokens)]["compute_s"].append(compute)
                throttled = _throttling(before, _cpu_stat(ready))
                total = cgroups[memory]["throttling"]
                for key, value in throttled.items():
                    total[key] = total.get(key, 0) + value
                for tokens, rts in times.items():
                    samples[(memory, tokens)]["round_trip_s"].extend(rts)
                    samples[(memory, tokens)]["round_means_s"].append(float(np.mean(rts)))
            progress.show("", advance=1)
    finally:
        for _, _, caller in functions:
            caller.close()
    for _, ready, _ in functions:
        node.stop(ready.instance_id)
    return samples, list(cgroups.values())


def _cold_starts(node: Node, s: Settings, gb_per_vcpu: float, experts_per_layer: int, layers: int,
                 progress: Progress) -> list[dict]:

    out = []
    for repeat in range(s.cold_repeats):
        for n in s.cold_experts:  # interleaved sizes
            experts = [(i // experts_per_layer % layers, i % experts_per_layer) for i in range(n)]
            progress.show(f"cold start: {n} experts ({repeat + 1}/{s.cold_repeats})")
            ready, elapsed = node.spawn(experts, s.cold_memory, s.cold_memory / gb_per_vcpu)
            record = read_run_record(node.run_dir, ready.instance_id)
            node.stop(ready.instance_id)
            out.append({"experts": n, "bytes": int(record.get("bytes_read", 0)), "seconds": elapsed,
                        "stages": dict(ready.stages)})
            progress.show(f"cold start: {n} experts", advance=1)
    return out


def _period_run(node: Node, s: Settings, hidden: int, dtype, gb_per_vcpu: float) -> dict:
    ready, _ = node.spawn([(0, 0)], s.period_memory, s.period_memory / gb_per_vcpu)
    caller = Caller(ready.endpoint, hidden, dtype)
    rts, computes, at = [], [], []
    try:
        for _ in range(WARMUP_CALLS):
            caller.call(0, 0, s.period_tokens)
        before = _cpu_stat(ready)
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < s.period_seconds:
            rt, compute = caller.call(0, 0, s.period_tokens)
            rts.append(rt)
            computes.append(compute)
            at.append(now - start)
        throttling = _throttling(before, _cpu_stat(ready))
    finally:
        caller.close()
    node.stop(ready.instance_id)
    return {"period_us": node.config.functions.cfs_period_us, "memory_gb": s.period_memory,
            "cpu_share": s.period_memory / gb_per_vcpu, "tokens": s.period_tokens,
            "cgroups": _cgroup_state(ready), "throttling": throttling, "calls_per_s": len(rts) / s.period_seconds,
            "round_trip_s": _stats(rts), "compute_s": _stats(computes),
            "trace": {"at_s": at, "round_trip_s": rts}}


def _expert_points(samples, memory_sizes, token_counts, activation_bytes: int, saturation_gb: float):
    """Per point stats, the transport overhead per call size and the fitted expert times.

    The overhead of a call size is the median of round trip - compute_s over the sizes at or
    above saturation (never throttled; the largest size if none is)."""
    unthrottled = [m for m in memory_sizes if m >= saturation_gb] or [max(memory_sizes)]
    overhead = {}
    for t in token_counts:
        gaps = [np.subtract(samples[(m, t)]["round_trip_s"], samples[(m, t)]["compute_s"]) for m in unthrottled]
        overhead[t] = float(np.median(np.concatenate(gaps)))
    rows = []
    for (memory, t), s in sorted(samples.items()):
        rt, compute = _stats(s["round_trip_s"]), _stats(s["compute_s"])
        rt["median_of_round_means"] = float(np.median(s["round_means_s"]))
        rt["round_means"] = s["round_means_s"]
        expert = max(rt["median_of_round_means"] - overhead[t], compute["median"], 1e-7)
        rows.append({"memory_gb": memory, "tokens": t, "bytes": 2 * t * activation_bytes,
                     "round_trip_s": rt, "compute_s": compute, "overhead_s": overhead[t], "expert_s": expert})
    return rows, overhead


def _named(report: FitReport, name: str) -> FitReport:
    return dataclasses.replace(report, family=name)


def plot_period(runs: list[dict], path: Path) -> None:
    """PNG: per-call round trip over time (left) and its distribution (right), one colour per period."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    over_time, cdf = figure.subplots(1, 2)
    for colour, run in zip(["tab:blue", "tab:red", "tab:green"], runs):
        label = f"{run['period_us'] / 1000:g} ms period"
        rt = np.asarray(run["trace"]["round_trip_s"]) * 1e3
        over_time.plot(run["trace"]["at_s"], rt, ".", ms=2, color=colour, label=label)
        ordered = np.sort(rt)
        cdf.plot(ordered, np.arange(1, ordered.size + 1) / ordered.size, color=colour, label=label)
    over_time.set_yscale("log")
    over_time.set_xlabel("time (s)")
    over_time.set_ylabel("round trip (ms)")
    share = runs[0]["cpu_share"] if runs else 0
    over_time.set_title(f"back-to-back calls at {share:.0%} of a vCPU")
    cdf.set_xscale("log")
    cdf.set_xlabel("round trip (ms)")
    cdf.set_ylabel("fraction of calls")
    cdf.set_title("distribution")
    for axes in (over_time, cdf):
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def run_profile(s: Settings) -> dict:
    """Measure, fit, write the JSON and PNGs; returns what was written and measured."""
    overrides: dict[str, object] = {"model.path": s.model} if s.model else {}
    if s.period_us is not None:
        overrides["functions.cfs_period_us"] = s.period_us
    config = load_config(s.config, overrides)
    if s.cold_repeats < 1 or s.calls < 1 or s.rounds < 1 or len(set(s.memory)) < 2 or not s.tokens or not s.cold_experts:
        raise MeshError("profile: need --calls, --rounds and --cold-repeats >= 1, two or more --memory sizes, "
                        "--tokens and --cold-experts", code="config_error", hint="see `moemesh profile --help`")
    if s.family not in ("best", *FAMILIES):
        raise MeshError(f"--family {s.family!r}: expected best or one of {', '.join(FAMILIES)}",
                        code="config_error", hint="see `moemesh profile --help`")
    model_path = config.model.resolved_path()
    model_name = model_path.resolve().name
    model = MoEConfig.from_file(model_path)
    shape = planning.model_shape(model, name=model_name)
    if max(s.cold_experts) > model.num_experts * model.num_moe_layers or min(s.cold_experts) < 1:
        raise MeshError(f"--cold-experts {','.join(map(str, s.cold_experts))}: {model_name} has "
                        f"{model.num_experts * model.num_moe_layers} experts", code="config_error",
                        hint="give counts from 1 to the model's number of experts")
    host = s.host or default_host()
    f = config.functions
    dtype = getattr(torch, config.model.dtype)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    activation_bytes = model.hidden_size * dtype_bytes
    saturation = s.saturation_gb if s.saturation_gb is not None else f.threads_per_function * f.gb_per_vcpu
    memory = tuple(sorted(set(s.memory)))
    tokens = tuple(sorted(set(s.tokens)))
    compare = s.period_us_compare and s.period_us_compare != f.cfs_period_us
    total = 1 + max(1, min(s.rounds, s.calls)) + len(s.cold_experts) * s.cold_repeats + 2 + (2 if compare else 0)
    progress = Progress(total, s.quiet)
    run_dir = Path(tempfile.mkdtemp(prefix="moemesh-profile-"))
    started = time.time()
    load_before = os.getloadavg()[0]
    try:
        progress.show(f"starting a node daemon ({f.cfs_period_us / 1000:g} ms CFS period)")
        with Node(config, model_path, f.cfs_period_us, run_dir, "a") as node:
            node.wait_warm()
            samples, cgroups = _sweep(node, s, memory, tokens, model.hidden_size, dtype, f.gb_per_vcpu, progress)
            cold = _cold_starts(node, s, f.gb_per_vcpu, model.num_experts, model.num_moe_layers, progress)
            progress.show(f"CFS period {f.cfs_period_us / 1000:g} ms: {s.period_seconds:g} s of calls")
            periods = [_period_run(node, s, model.hidden_size, dtype, f.gb_per_vcpu)]
            progress.show("", advance=1)
        if compare:
            progress.show(f"starting a node daemon ({s.period_us_compare / 1000:g} ms CFS period)")
            with Node(config, model_path, s.period_us_compare, run_dir, "b") as node:
                node.wait_warm()
                progress.show("", advance=1)
                progress.show(f"CFS period {s.period_us_compare / 1000:g} ms: {s.period_seconds:g} s of calls")
                periods.append(_period_run(node, s, model.hidden_size, dtype, f.gb_per_vcpu))
                progress.show("", advance=1)
    except BaseException:
        if not s.quiet:
            print(file=sys.stderr)
        print(f"moemesh profile: logs kept in {run_dir}", file=sys.stderr)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    progress.show("fitting")

    rows, overhead = _expert_points(samples, memory, tokens, activation_bytes, saturation)
    points = np.array([[r["memory_gb"], r["tokens"], r["expert_s"]] for r in rows])
    fit_points = points.copy()
    fit_points[:, 0] = np.minimum(fit_points[:, 0], saturation)  # the fit's objective ignores the cap
    with warnings.catch_warnings():  # curve_fit's "covariance could not be estimated": errors are reported below
        warnings.simplefilter("ignore", OptimizeWarning)
        fit = fit_expert_latency(fit_points, saturation_gb=saturation,
                                 token_slope=None if len(tokens) > 1 else 0.0)
    chosen = fit.best if s.family == "best" else fit.candidates[s.family]
    sg_bytes = [2 * t * activation_bytes for t in tokens]
    if len(tokens) > 1:
        scatter_gather, sg_report = fit_linear(sg_bytes, [overhead[t] for t in tokens])
    else:
        scatter_gather = LinearModel(overhead[tokens[0]], 0.0)
        sg_report = FitReport("linear", {"intercept": overhead[tokens[0]], "slope": 0.0}, 0.0, 0.0, math.inf, 1)
    cold_bytes = [c["bytes"] for c in cold]
    if len(set(cold_bytes)) > 1:
        cold_start, cold_report = fit_linear(cold_bytes, [c["seconds"] for c in cold])
    else:
        mean = float(np.mean([c["seconds"] for c in cold]))
        cold_start = LinearModel(mean, 0.0)
        cold_report = FitReport("linear", {"intercept": mean, "slope": 0.0}, 0.0, 0.0, math.inf, len(cold))
    profiles = dataclasses.replace(
        Profiles.synthetic(shape, host=host), model=model_name, expert=chosen,
        scatter_gather=scatter_gather, cold_start=cold_start,
        reports=(*fit.reports, _named(sg_report, "scatter_gather"), _named(cold_report, "cold_start")),
    )

    enforced = all(c["enforced"] for c in cgroups + [p["cgroups"] for p in periods])
    skipped = sorted({c["skipped"] for c in cgroups + [p["cgroups"] for p in periods] if c["skipped"]})
    data = json.loads(profiles.to_json())
    data["measurement"] = {
        "host": host, "model": model_name, "model_path": str(model_path), "at": started,
        "duration_s": time.time() - started, "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "measured": list(MEASURED), "assumed": list(ASSUMED),
        "cgroups": {"enforced": enforced, "skipped": skipped, "per_memory": cgroups},
        "functions": {"gb_per_vcpu": f.gb_per_vcpu, "cfs_period_us": f.cfs_period_us,
                      "threads_per_function": f.threads_per_function, "spawn": f.spawn, "dtype": config.model.dtype},
        "fitted_quantity": "median over rounds of the round's mean round trip, minus the transport overhead "
                           "of the call size (seconds)",
        "saturation_gb": saturation, "chosen_family": chosen.curve.family, "family_option": s.family,
        "points": rows, "transport_overhead_s": {str(t): overhead[t] for t in tokens},
        "cold_starts": cold,
        "period_comparison": [{k: v for k, v in p.items() if k != "trace"} for p in periods],
    }
    path = profile_path(s.out, host, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)
    fits_png = path.with_name(f"{model_name}-fits.png")
    period_png = path.with_name(f"{model_name}-period.png")
    plot_fits(points, {f"{k} fit": v for k, v in fit.candidates.items()}, fits_png)
    plot_period(periods, period_png)
    progress.done()
    return {"path": path, "fits_png": fits_png, "period_png": period_png, "profiles": profiles, "fit": fit,
            "rows": rows, "cold": cold, "periods": periods, "enforced": enforced, "skipped": skipped,
            "data": data}


# ------------------------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def render(result: dict) -> str:
    fit, profiles, data = result["fit"], result["profiles"], result["data"]
    m = data["measurement"]
    out = [f"moemesh profile: host {m['host']}, model {m['model']} ({m['cpus']} CPUs, "
           f"{m['functions']['threads_per_function']} thread(s) per function, "
           f"{m['functions']['gb_per_vcpu']:g} GB per vCPU, {m['duration_s']:.0f} s)"]
    if not result["enforced"]:
        banner = "!" * 78
        out += [banner, "!! CPU SHARE NOT ENFORCED: cgroup limits could not be applied, so every size ran",
                "!! at full speed and the memory curve below is NOT the platform's.",
                *(f"!! {why}" for why in result["skipped"]), banner]
    load = m["load_average_1min"]
    if max(load.values()) > 0.5 * (m["cpus"] or 1):
        out.append(f"note: the host was busy (1-min load average {load['before']:.1f} before, {load['after']:.1f} "
                   f"after, on {m['cpus']} CPUs): other processes' work is in these numbers")
    out.append("")
    out.append("expert calls, one expert per function (ms). rt: round trip; cmp: the worker's compute_s;")
    out.append("  rt MoM: median over rounds of the round's mean round trip; expert = rt MoM - transport overhead")
    out.append("  memory  vCPU  tokens   rt med   rt p90   rt MoM  cmp med  cmp p90   expert"
               + "".join(f" {k[:5]:>8}" for k in fit.candidates))
    for r in result["rows"]:
        cpu = r["memory_gb"] / m["functions"]["gb_per_vcpu"]
        fits = "".join(_ms(float(v.seconds(r["memory_gb"], r["tokens"]))) + " " for v in fit.candidates.values())
        out.append(f"  {r['memory_gb']:5.2f}G {cpu:5.2f} {r['tokens']:7d} {_ms(r['round_trip_s']['median'])} "
                   f"{_ms(r['round_trip_s']['p90'])} {_ms(r['round_trip_s']['median_of_round_means'])} "
                   f"{_ms(r['compute_s']['median'])} {_ms(r['compute_s']['p90'])} {_ms(r['expert_s'])} "
                   + fits.rstrip())
    quota = []
    for c in m["cgroups"]["per_memory"]:
        th = c.get("throttling") or {}
        if th:
            quota.append(f"{c['memory_gb']:g} GB {th['throttled_periods']}/{th['periods']} periods, "
                         f"{th['throttled_s'] * 1e3:.0f} ms")
    if quota:
        out.append("  throttled by the CPU quota: " + "; ".join(quota))
    out.append("")
    out.append(f"fits of expert time vs (memory, tokens), memory capped at {m['saturation_gb']:g} GB:")
    for report in fit.reports:
        mark = "  <- stored" if report.family == profiles.expert.curve.family else ""
        params = ", ".join(f"{k} {v:.4g}" for k, v in report.parameters.items())
        out.append(f"  {report.family:<12} RMSE {report.rmse_s * 1e3:.4f} ms, mean relative error "
                   f"{report.relative_error:.1%}, residual std error {report.residual_standard_error_s * 1e3:.4f} ms"
                   f"  [{params}]{mark}")
    sg = profiles.scatter_gather
    out.append("")
    out.append(f"scatter-gather (round trip - compute_s, median, at memory >= {m['saturation_gb']:g} GB):")
    for t, seconds in m["transport_overhead_s"].items():
        out.append(f"  {int(t):4d} tokens {2 * int(t) * profiles.shape.activation_bytes:8d} B  {_ms(seconds)} ms")
    sg_report = next(r for r in profiles.reports if r.family == "scatter_gather")
    out.append(f"  fit: {sg.intercept * 1e3:.3f} ms + bytes / {sg.bandwidth / 1e6:.1f} MB/s "
               f"(RMSE {sg_report.rmse_s * 1e3:.4f} ms)")
    cs = profiles.cold_start
    out.append("")
    out.append(f"cold start ({m['functions']['spawn']}, SpawnFunction -> InstanceReady; stages are medians):")
    for n in sorted({c["experts"] for c in result["cold"]}):
        runs = [c for c in result["cold"] if c["experts"] == n]
        stages = ", ".join(f"{k} {statistics.median(c['stages'][k] for c in runs) * 1e3:.1f}"
                           for k in runs[0]["stages"])
        out.append(f"  {n:3d} experts {runs[0]['bytes']:10d} B  median {statistics.median(c['seconds'] for c in runs) * 1e3:7.1f} ms"
                   f"  ({stages} ms)")
    cs_report = next(r for r in profiles.reports if r.family == "cold_start")
    bandwidth = "inf" if math.isinf(cs.bandwidth) else f"{cs.bandwidth / 1e6:.1f}"
    out.append(f"  fit: {cs.intercept * 1e3:.1f} ms + bytes / {bandwidth} MB/s (RMSE {cs_report.rmse_s * 1e3:.2f} ms)")
    out.append("")
    periods = result["periods"]
    if periods:
        p0 = periods[0]
        out.append(f"CFS period: back-to-back {p0['tokens']}-token calls at {p0['cpu_share']:.0%} of a vCPU "
                   f"for {periods[0]['round_trip_s']['n'] / max(p0['calls_per_s'], 1e-9):.1f} s (ms):")
        out.append("  period     calls/s   median      p90      p99      max     mean   throttled        cgroup")
        for p in periods:
            rt, th = p["round_trip_s"], p["throttling"]
            applied = p["cgroups"]["values"]
            quota = (f"quota {applied['cpu_quota_us']} us / {applied['cpu_period_us']} us"
                     if "cpu_quota_us" in applied else "NOT ENFORCED")
            throttled = (f"{th['throttled_periods']}/{th['periods']} periods, {th['throttled_s'] * 1e3:.0f} ms"
                         if th else "-")
            out.append(f"  {p['period_us'] / 1000:5g} ms {p['calls_per_s']:10.0f} {_ms(rt['median'])} "
                       f"{_ms(rt['p90'])} {_ms(rt['p99'])} {_ms(rt['max'])} {_ms(rt['mean'])}   {throttled:<16} {quota}")
    out.append("")
    out.append(f"wrote {result['path']}")
    out.append(f"      {result['fits_png']}")
    out.append(f"      {result['period_png']}")
    out.append("assumed, not measured: " + ", ".join(ASSUMED))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    ap.add_argument("--model", default=None,
                    help="model directory (HF layout) or 'bundled' (default: the config's [model] path)")
    ap.add_argument("--memory", default=",".join(f"{v:g}" for v in d.memory), help="function sizes, GB")
    ap.add_argument("--tokens", default=",".join(map(str, d.tokens)), help="tokens per call")
    ap.add_argument("--calls", type=int, default=d.calls, help="calls per (memory, tokens) point")
    ap.add_argument("--rounds", type=int, default=d.rounds,
                    help="the calls are made in this many rounds over all sizes; the fit takes the median of round means")
    ap.add_argument("--period-us", type=int, default=None,
                    help="CFS period of the sweep (default: [functions] cfs_period_us)")
    ap.add_argument("--period-us-compare", type=int, default=d.period_us_compare,
                    help="the CFS period to compare with (0: no comparison)")
    ap.add_argument("--period-memory", type=float, default=d.period_memory, help="GB of the period comparison's function")
    ap.add_argument("--period-tokens", type=int, default=d.period_tokens, help="tokens per call in the period comparison")
    ap.add_argument("--period-seconds", type=float, default=d.period_seconds, help="seconds of calls per period")
    ap.add_argument("--cold-experts", default=",".join(map(str, d.cold_experts)), help="experts per cold-started function")
    ap.add_argument("--cold-repeats", type=int, default=d.cold_repeats)
    ap.add_argument("--cold-memory", type=float, default=d.cold_memory, help="GB of the cold-started functions")
    ap.add_argument("--saturation-gb", type=float, default=None,
                    help="memory beyond which a function is no faster (default threads_per_function x gb_per_vcpu)")
    ap.add_argument("--family", default=d.family, choices=("best", *FAMILIES), help="the fit to store")
    ap.add_argument("--out", type=Path, default=d.out, help="profiles folder: writes <out>/<host>/<model>.json")
    ap.add_argument("--host", default="", help="host name to store the profile under (default: this machine's)")
    ap.add_argument("--config", default=None, help="launch.toml for [functions] and [model] (default: built-in defaults)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    settings = Settings(
        model=args.model, memory=tuple(_floats(args.memory)), tokens=tuple(_ints(args.tokens)), calls=args.calls,
        rounds=args.rounds,
        period_us=args.period_us, period_us_compare=args.period_us_compare, period_memory=args.period_memory,
        period_tokens=args.period_tokens, period_seconds=args.period_seconds,
        cold_experts=tuple(_ints(args.cold_experts)), cold_repeats=args.cold_repeats, cold_memory=args.cold_memory,
        saturation_gb=args.saturation_gb, family=args.family, out=args.out, host=args.host, config=args.config,
        quiet=args.quiet,
    )
    try:
        result = run_profile(settings)
    except MeshError as exc:
        print(f"moemesh profile: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
