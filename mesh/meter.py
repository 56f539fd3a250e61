"""The meter: bills every function in GB-s, records cold starts, TTFT/TPOT and SLO attainment,
flags stragglers, and builds the snapshot the coordinator publishes (tui/ shows only this).

Billing modes (DESIGN.md, "Billing, SLOs, stragglers"):
- *instance*   (Knative / Kubernetes style): memory_gb x (stop - start) of every instance,
               keep-alive included; the main function likewise from its start.
- *invocation* (Lambda style): memory_gb x sum of each call's duration rounded up to `round_ms`,
               plus the cold start's INIT time when `bill_init`; the main function x its busy
               (forward-pass) time; plus a price per request.
The all-local baseline is what the serverful deployment (every expert in the main function)
would be billed for the same traffic, in the same mode.

Thread-safety (STYLE.md item 16): the engine thread never takes the meter's lock. It hands the
meter one `RoundRecord` per scatter-gather round and one `StepRecord` per engine step through
`post()`, a lock-free append; the meter folds them under its lock whenever something reads it
(a snapshot, billing, a finished request). The asyncio thread reports instance lifecycle and
requests through the locked methods. A snapshot never stalls a round.

SLO attainment (DESIGN.md): a request meets its SLO when it finished normally with TTFT and TPOT
within its class's targets; a request that failed or timed out is a miss, tokens or not. A
request the client cancelled is counted apart (`cancelled`), neither met nor missed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

FAILED_REASONS = ("error", "timeout")  # finish reasons that are SLO misses whatever the latencies
IDLE_GAP_S = 0.5  # calls of one function closer than this are one busy period, not an idle time
IDLE_SAMPLES = 1000  # idle times kept per function
DEATHS = ("died", "failed", "hung")  # instance stop reasons that are deaths (not a scale-to-zero)


def _on_gpu(device: str) -> bool:
    """A plan says "gpu", a torch device "cuda" or "cuda:N": either is billed at the GPU price."""
    return device == "gpu" or device.startswith("cuda")


@dataclass(frozen=True)
class Prices:
    mode: str = "instance"  # "instance" | "invocation"
    cpu_gb_s: float = 0.0000166667  # AWS Lambda x86 list price, $ per GB-s
    gpu_gb_s: float = 0.00005  # 3 x CPU (Remoe: c_g / c_c >= 3)
    per_million_requests: float = 0.20
    bill_init: bool = True  # AWS bills INIT since Aug 2025
    round_ms: float = 1.0


@dataclass(frozen=True)
class Reply:
    """One answered ExpertCall of a round."""

    instance_id: str
    function_id: str
    latency_s: float  # round trip as the executor saw it (stragglers)
    compute_s: float  # the worker's own execution time (billed in invocation mode)
    rows: int  # token-slots it computed


@dataclass
class RoundRecord:
    """Everything one scatter-gather round tells the meter, handed over once (no lock)."""

    layer: int
    layers: int
    counts: np.ndarray  # [experts] token-slots routed to each expert this round
    request_ids: list[str]
    replies: list[Reply] = field(default_factory=list)
    calls: int = 0  # ExpertCalls sent (retries included)
    fallbacks: int = 0  # chunks computed in the main function after their calls failed
    retries: int = 0
    late: int = 0  # calls given up on after call_timeout_s
    waited_for: list[str] = field(default_factory=list)  # instances whose cold start this round waited for
    on_demand: list[dict] = field(default_factory=list)  # experts loaded into the main function on the path
    dropped: int = 0  # token-slots dropped by a capacity factor (they change tokens)
    seconds: float = 0.0
    at: float = 0.0  # unix time the round started (0: the meter's clock when folded)
    shm_calls: int = 0  # calls whose rows went through shared memory
    cold_wait_s: float = 0.0  # of its seconds, the main function idle waiting for cold starts


@dataclass(frozen=True)
class StepRecord:
    """One engine step: the main function's busy time."""

    busy_s: float


@dataclass
class InstanceRecord:
    instance_id: str
    function_id: str
    node: str
    memory_gb: float
    experts: list
    replica: int
    path: str
    keep_alive_s: float
    requested_at: float
    device: str = "cpu"
    started_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    stop_reason: str = ""
    state: str = "starting"
    stages: dict = field(default_factory=dict)
    critical_path: bool = False
    invocations: int = 0
    rows: int = 0  # token-slots it computed
    billed_call_s: float = 0.0
    busy_s: float = 0.0
    last_used: float | None = None
    cgroup: dict | None = None
    cgroup_skipped: str = ""
    pid: int = 0
    endpoint: str = ""

    def lifetime(self, now: float) -> float:
        if self.started_at is None:
            return 0.0
        return max(0.0, (self.stopped_at or now) - self.started_at)

    def init_s(self) -> float:
        """Cold start to ready: every stage (the critical-path latency)."""
        return sum(self.stages.values())

    def billed_init_s(self) -> float:
        """INIT as Lambda bills it: the function's own start (limits, weights, ready), not the
        platform's sandbox creation ("spawn": the fork, queued behind other forks on a busy node)."""
        return sum(v for k, v in self.stages.items() if k != "spawn")


@dataclass
class RequestRecord:
    request_id: str
    slo_class: str
    prompt_tokens: int
    admitted_at: float
    first_token_at: float | None = None
    done_at: float | None = None
    generated_tokens: int = 0
    finish_reason: str = ""
    remote_calls: int = 0
    fallbacks: int = 0
    cold_starts_on_path: list = field(default_factory=list)
    estimate: dict | None = None  # the planner's figures for this request (allocator.cost)

    @property
    def failed(self) -> bool:
        return self.finish_reason in FAILED_REASONS

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.admitted_at

    @property
    def tpot_s(self) -> float | None:
        if self.done_at is None or self.first_token_at is None:
            return None
        return (self.done_at - self.first_token_at) / max(1, self.generated_tokens - 1)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99}


class Meter:
    def __init__(
        self,
        prices: Prices,
        slo_classes: dict[str, tuple[float, float]],
        straggler_k: float = 3.0,
        window_s: float = 300.0,
        clock=time.time,
    ) -> None:
        self.prices = prices
        self.slo_classes = dict(slo_classes)
        self.straggler_k = straggler_k
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self.instances: dict[str, InstanceRecord] = {}
        self.requests: dict[str, RequestRecord] = {}
        self.finished: deque[RequestRecord] = deque(maxlen=10_000)
        self.stragglers: deque[dict] = deque(maxlen=200)
        self.cold_starts: deque[dict] = deque(maxlen=200)
        self.deaths: deque[dict] = deque(maxlen=200)
        self.imbalance: dict[int, float] = {}
        self.load: np.ndarray | None = None  # [layers, experts] token-slot counts so far
        self.main_memory_gb = 0.0
        self.main_device = "cpu"
        self.main_started_at = self.started
        self.main_busy_s = 0.0
        self.main_since = self.started  # main memory has been main_memory_gb since then
        self.main_gb_s_before = 0.0  # instance mode: GB-s of earlier main sizes
        self.main_busy_gb_s = 0.0  # invocation mode: sum of memory x busy seconds (and of its loads)
        self.main_load_gb_s = 0.0  # of which the re-plans' expert loads (main_loaded)
        self.main_cold_wait_s = 0.0  # of main_busy_s, rounds idle waiting for cold starts (not all-local's)
        self.requests_total = 0
        self.retired: dict[str, dict] = {}  # function id -> billing of instances folded away
        self.keep_stopped = 500  # stopped instance records kept in detail
        self.baseline_main_memory_gb: float | None = None
        self.main_held_bytes = 0  # tensors the main function really holds
        self.main_experts = 0  # routed experts among them
        self.policy: dict = {}
        self.nodes: list[dict] = []
        self.rounds = 0
        self.data_plane = {"calls": 0, "replies": 0, "fallbacks": 0, "retries": 0, "late": 0,
                           "on_demand_loads": 0, "cold_start_waits": 0, "dropped_slots": 0,
                           "shm_calls": 0}
        self._posted: deque = deque()  # RoundRecord / StepRecord from the engine thread, not yet folded
        # Per function: when it last worked, and its idle times (gaps of at least IDLE_GAP_S
        # between calls: a request's back-to-back rounds are one busy period), newest last:
        # what an adaptive keep-alive learns from (allocator/keepalive.py, [functions] keep_alive_policy).
        self.last_call: dict[str, float] = {}
        self.idle: dict[str, deque] = {}

    # -- main function ---------------------------------------------------------------------

    def set_main(self, memory_gb: float, device: str = "cpu", baseline_memory_gb: float | None = None) -> None:
        """The main function's size from now on (a re-plan may resize it; earlier time keeps its size)."""
        with self._lock:
            self._fold()  # busy time so far is billed at the size it ran with
            now = self.clock()
            self.main_gb_s_before += self.main_memory_gb * (now - self.main_since)
            self.main_since = now
            self.main_memory_gb, self.main_device = memory_gb, device
            self.baseline_main_memory_gb = baseline_memory_gb

    def main_held(self, held_bytes: int, experts: int) -> None:
        """What the main function's process holds now (its billed size comes through set_main)."""
        with self._lock:
            self.main_held_bytes, self.main_experts = int(held_bytes), int(experts)

    def main_loaded(self, experts: list, seconds: float, why: str) -> None:
        """The main function loaded these experts (a re-plan): timed, and billed like a cold
        start (in invocation mode its seconds at the main's size now, which set_main gave after
        the load; instance mode bills the main's whole wall anyway). Not main busy time: the
        all-local baseline would not have loaded them."""
        with self._lock:
            if self.prices.mode == "invocation" and self.prices.bill_init:
                self.main_busy_gb_s += self.main_memory_gb * float(seconds)
                self.main_load_gb_s += self.main_memory_gb * float(seconds)
            self.cold_starts.append({
                "time": self.clock(), "instance_id": "main", "function_id": "main", "node": "main",
                "path": why, "experts": [list(e) for e in experts], "stages": {"weights": seconds},
                "total_s": seconds, "critical_path": False})

    def main_busy(self, seconds: float) -> None:
        self.post(StepRecord(seconds))

    # -- the engine thread's hand-over --------------------------------------------------------

    def post(self, record: RoundRecord | StepRecord) -> None:
        """Hand over one round's or step's figures; never blocks (deque.append is atomic)."""
        self._posted.append(record)

    def _fold(self) -> None:
        """Apply every posted record (caller holds the lock)."""
        posted = self._posted
        while posted:
            record = posted.popleft()
            if isinstance(record, StepRecord):
                self.main_busy_s += record.busy_s
                self.main_busy_gb_s += self.main_memory_gb * record.busy_s
            else:
                self._round(record)

    def _round(self, rec: RoundRecord) -> None:
        self._layer_load(rec.layer, rec.counts, rec.layers)
        at = rec.at or self.clock()
        for reply in rec.replies:
            self._invocation(reply.instance_id, reply.latency_s, reply.compute_s, reply.rows)
            last = self.last_call.get(reply.function_id)
            if last is not None and at - last >= IDLE_GAP_S:
                self.idle.setdefault(reply.function_id, deque(maxlen=IDLE_SAMPLES)).append(at - last)
            if last is None or at > last:
                self.last_call[reply.function_id] = at
        self._scatter_round(rec.layer, [(r.instance_id, r.function_id, r.latency_s) for r in rec.replies])
        for instance_id in rec.waited_for:
            self._cold_start_on_path(instance_id, rec.request_ids)
        for load in rec.on_demand:
            self.cold_starts.append({**load, "critical_path": True})
        dp = self.data_plane
        dp["calls"] += rec.calls
        dp["replies"] += len(rec.replies)
        dp["fallbacks"] += rec.fallbacks
        dp["retries"] += rec.retries
        dp["late"] += rec.late
        dp["on_demand_loads"] += len(rec.on_demand)
        dp["cold_start_waits"] += len(rec.waited_for)
        dp["dropped_slots"] += rec.dropped
        dp["shm_calls"] += rec.shm_calls
        self.main_cold_wait_s += rec.cold_wait_s  # left out of the all-local baseline
        if rec.calls or rec.fallbacks:
            for rid in rec.request_ids:
                req = self.requests.get(rid)
                if req is not None:
                    req.remote_calls += len(rec.replies)
                    req.fallbacks += rec.fallbacks
                    req.cold_starts_on_path += [f"main:{o['experts']}" for o in rec.on_demand]

    def idle_times(self, function_id: str) -> list[float]:
        """The function's idle times so far (seconds, oldest first; at most IDLE_SAMPLES)."""
        with self._lock:
            self._fold()
            return list(self.idle.get(function_id, ()))

    # -- instances ---------------------------------------------------------------------------

    def instance_requested(self, instance_id: str, function_id: str, node: str, memory_gb: float,
                           experts: list, replica: int, path: str, keep_alive_s: float,
                           device: str = "cpu") -> None:
        """device: "gpu" for an instance on a GPU node (billed at the GPU price), else "cpu"."""
        with self._lock:
            self.instances[instance_id] = InstanceRecord(
                instance_id, function_id, node, memory_gb, [list(e) for e in experts], replica, path,
                keep_alive_s, requested_at=self.clock(), device="gpu" if _on_gpu(device) else "cpu",
            )

    def instance_ready(self, instance_id: str, started_at: float, stages: dict, cgroup: dict | None = None,
                       cgroup_skipped: str = "", pid: int = 0, endpoint: str = "") -> None:
        with self._lock:
            rec = self.instances.get(instance_id)
            if rec is None:
                return
            rec.started_at, rec.ready_at, rec.state = started_at, self.clock(), "warm"
            rec.stages, rec.cgroup, rec.cgroup_skipped = dict(stages), cgroup, cgroup_skipped
            rec.pid, rec.endpoint = pid, endpoint
            rec.last_used = rec.ready_at
            self.cold_starts.append({
                "time": rec.ready_at, "instance_id": instance_id, "function_id": rec.function_id,
                "node": rec.node, "path": rec.path, "stages": dict(stages), "total_s": rec.init_s(),
                "critical_path": rec.critical_path,  # a round may have waited for it before this call
            })

    def _cold_start_on_path(self, instance_id: str, request_ids: list[str]) -> None:
        """A round waited for this instance's cold start: mark it on those requests' critical path."""
        rec = self.instances.get(instance_id)
        if rec is None or rec.critical_path:
            return
        rec.critical_path = True
        for cs in self.cold_starts:
            if cs.get("instance_id") == instance_id:
                cs["critical_path"] = True
        for rid in request_ids:
            if rid in self.requests:
                self.requests[rid].cold_starts_on_path.append(instance_id)

    def instance_stopped(self, instance_id: str, stopped_at: float, reason: str, started_at: float | None = None) -> None:
        with self._lock:
            rec = self.instances.get(instance_id)
            if rec is None or rec.stopped_at is not None:
                return
            if rec.started_at is None and started_at:
                rec.started_at = started_at
            rec.stopped_at, rec.stop_reason = stopped_at, reason
            rec.state = "failed" if reason in DEATHS else "stopped"
            if reason in DEATHS:
                self.deaths.append({"time": stopped_at, "instance_id": instance_id,
                                    "function_id": rec.function_id, "node": rec.node, "reason": reason})

    def set_state(self, instance_id: str, state: str) -> None:
        with self._lock:
            rec = self.instances.get(instance_id)
            if rec is not None and rec.stopped_at is None:
                rec.state = state

    # -- the data path -----------------------------------------------------------------------

    def invocation(self, instance_id: str, latency_s: float, compute_s: float, rows: int = 0) -> None:
        """One call: billed, as Lambda bills, for the function's own execution time (compute_s,
        measured by the worker) rounded up to round_ms; latency_s (round trip) is for stragglers."""
        with self._lock:
            self._invocation(instance_id, latency_s, compute_s, rows)

    def _invocation(self, instance_id: str, latency_s: float, compute_s: float, rows: int = 0) -> None:
        rec = self.instances.get(instance_id)
        if rec is None:
            return
        rec.invocations += 1
        rec.rows += rows
        step = self.prices.round_ms / 1000.0
        rec.billed_call_s += math.ceil(compute_s / step - 1e-9) * step if step > 0 else compute_s
        rec.busy_s += compute_s
        rec.last_used = self.clock()

    def scatter_round(self, layer: int, replies: list[tuple[str, str, float]]) -> list[dict]:
        """replies: (instance_id, function_id, latency_s) of one scatter-gather round.
        Flags replies later than straggler_k x the round's median; returns the flagged ones."""
        with self._lock:
            return self._scatter_round(layer, replies)

    def _scatter_round(self, layer: int, replies: list[tuple[str, str, float]]) -> list[dict]:
        self.rounds += 1
        if len(replies) < 2:
            return []
        median = float(np.median([r[2] for r in replies]))
        flagged = []
        for instance_id, function_id, latency in replies:
            if median > 0 and latency > self.straggler_k * median:
                item = {"time": self.clock(), "instance_id": instance_id, "function_id": function_id,
                        "layer": layer, "latency_s": latency, "median_s": median, "ratio": latency / median}
                self.stragglers.append(item)
                flagged.append(item)
        return flagged

    def layer_load(self, layer: int, counts: np.ndarray, layers: int) -> None:
        """counts [experts] token-slots routed to each expert in one MoE layer pass."""
        with self._lock:
            self._layer_load(layer, counts, layers)

    def _layer_load(self, layer: int, counts: np.ndarray, layers: int) -> None:
        if self.load is None or self.load.shape != (layers, len(counts)):
            self.load = np.zeros((layers, len(counts)), dtype=np.int64)
        self.load[layer] += counts
        mean = float(counts.mean())
        if mean > 0:
            self.imbalance[layer] = float(counts.max()) / mean

    # -- requests ----------------------------------------------------------------------------

    def request_admitted(self, request_id: str, slo_class: str, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_total += 1
            self.requests[request_id] = RequestRecord(request_id, slo_class, prompt_tokens, self.clock())

    def request_estimate(self, request_id: str, estimate: dict | None) -> None:
        with self._lock:
            rec = self.requests.get(request_id)
            if rec is not None:
                rec.estimate = estimate

    def token(self, request_id: str) -> None:
        with self._lock:
            rec = self.requests.get(request_id)
            if rec is not None:
                if rec.first_token_at is None:
                    rec.first_token_at = self.clock()
                rec.generated_tokens += 1

    def request_done(self, request_id: str, finish_reason: str) -> dict:
        with self._lock:
            self._fold()
            rec = self.requests.pop(request_id, None)
            if rec is None:
                return {}
            rec.done_at, rec.finish_reason = self.clock(), finish_reason
            self.finished.append(rec)
            return self._record(rec)

    def _slo_met(self, rec: RequestRecord) -> bool:
        """Finished normally, first token within the TTFT target, mean TPOT within its target.
        A failed or timed-out request is a miss; a request without a first token is a miss."""
        if rec.failed or rec.ttft_s is None:
            return False
        ttft_target, tpot_target = self.slo_classes.get(rec.slo_class, (math.inf, math.inf))
        return rec.ttft_s <= ttft_target and (rec.tpot_s or 0.0) <= tpot_target

    def _record(self, rec: RequestRecord) -> dict:
        ttft_target, tpot_target = self.slo_classes.get(rec.slo_class, (None, None))
        return {
            "request_id": rec.request_id, "slo_class": rec.slo_class, "prompt_tokens": rec.prompt_tokens,
            "generated_tokens": rec.generated_tokens, "finish_reason": rec.finish_reason,
            "admitted_at": rec.admitted_at, "first_token_at": rec.first_token_at, "done_at": rec.done_at,
            "ttft_s": rec.ttft_s, "tpot_s": rec.tpot_s,
            "slo": {"ttft_target_s": ttft_target, "tpot_target_s": tpot_target, "met": self._slo_met(rec)},
            "remote_calls": rec.remote_calls, "fallbacks": rec.fallbacks,
            "cold_starts_on_path": list(rec.cold_starts_on_path), "policy": self.policy.get("name"),
            "estimate": rec.estimate,
        }

    # -- billing and the snapshot --------------------------------------------------------------

    def _instance_gb_s(self, rec: InstanceRecord, now: float) -> float:
        if self.prices.mode == "instance":
            return rec.memory_gb * rec.lifetime(now)
        init = rec.billed_init_s() if (self.prices.bill_init and rec.started_at is not None) else 0.0
        return rec.memory_gb * (rec.billed_call_s + init)

    def _main_seconds(self, now: float) -> float:
        return (now - self.main_started_at) if self.prices.mode == "instance" else self.main_busy_s

    def _baseline_seconds(self, now: float) -> float:
        """The all-local main's seconds for the same traffic: the main's own, less the time its
        rounds sat idle waiting for cold starts, which a main holding every expert never waits
        (counted in, a Qwen replay's 13 s first TTFT made all-local look 3x dearer than its own
        run). Calls to warm functions stay counted: all-local computes those rows itself. In
        instance mode the baseline is up as long as the mesh is, waits or not."""
        if self.prices.mode == "instance":
            return self._main_seconds(now)
        return max(0.0, self._main_seconds(now) - self.main_cold_wait_s)

    def _main_gb_s(self, now: float) -> float:
        if self.prices.mode == "instance":
            return self.main_gb_s_before + self.main_memory_gb * (now - self.main_since)
        return self.main_busy_gb_s

    def _retire(self, now: float) -> None:
        """Fold the oldest stopped instances into per-function totals, so a long-running mesh's
        billing and snapshots stay bounded. Their GB-s, cost and calls are kept exactly."""
        stopped = [r for r in self.instances.values() if r.stopped_at is not None]
        if len(stopped) <= self.keep_stopped:
            return
        stopped.sort(key=lambda r: r.stopped_at)
        for rec in stopped[: len(stopped) - self.keep_stopped]:
            entry = self.retired.setdefault(rec.function_id, {"gb_s": 0.0, "cost": 0.0, "invocations": 0})
            gb_s = self._instance_gb_s(rec, now)
            entry["gb_s"] += gb_s
            entry["cost"] += gb_s * (self.prices.gpu_gb_s if rec.device == "gpu" else self.prices.cpu_gb_s)
            entry["invocations"] += rec.invocations
            del self.instances[rec.instance_id]

    def billing(self) -> dict:
        with self._lock:
            self._fold()
            return self._billing(self.clock())

    def _billing(self, now: float) -> dict:
        self._retire(now)
        by_function: dict[str, dict] = {k: dict(v) for k, v in self.retired.items()}
        experts_gb_s = sum(v["gb_s"] for v in self.retired.values())
        invocations = sum(v["invocations"] for v in self.retired.values())
        for rec in self.instances.values():
            gb_s = self._instance_gb_s(rec, now)
            experts_gb_s += gb_s
            invocations += rec.invocations
            entry = by_function.setdefault(rec.function_id, {"gb_s": 0.0, "cost": 0.0, "invocations": 0})
            entry["gb_s"] += gb_s
            entry["cost"] += gb_s * (self.prices.gpu_gb_s if rec.device == "gpu" else self.prices.cpu_gb_s)
            entry["invocations"] += rec.invocations
        main_rate = self.prices.gpu_gb_s if _on_gpu(self.main_device) else self.prices.cpu_gb_s
        main_gb_s = self._main_gb_s(now)
        requests = self.requests_total
        per_request = self.prices.per_million_requests / 1e6
        cost = main_gb_s * main_rate + sum(f["cost"] for f in by_function.values())
        if self.prices.mode == "invocation":
            cost += (invocations + requests) * per_request
        baseline_gb_s = baseline_cost = None
        if self.baseline_main_memory_gb is not None:
            baseline_gb_s = self.baseline_main_memory_gb * self._baseline_seconds(now)
            baseline_cost = baseline_gb_s * main_rate
            if self.prices.mode == "invocation":
                baseline_cost += requests * per_request
        elapsed = max(1e-9, now - self.started)
        return {
            "mode": self.prices.mode, "currency": "USD", "gb_s": main_gb_s + experts_gb_s, "cost": cost,
            "gb_s_main": main_gb_s, "gb_s_main_loads": self.main_load_gb_s, "gb_s_experts": experts_gb_s,
            "main_cold_wait_s": self.main_cold_wait_s,
            "rate_gb_s_per_s": (main_gb_s + experts_gb_s) / elapsed, "invocations": invocations,
            "by_function": by_function,
            "baseline_all_local_gb_s": baseline_gb_s, "baseline_all_local_cost": baseline_cost,
        }

    def _slo(self, now: float) -> dict:
        recent = [r for r in self.finished if r.done_at is not None and now - r.done_at <= self.window_s]
        classes = {}
        for name, (ttft_target, tpot_target) in self.slo_classes.items():
            mine = [r for r in recent if r.slo_class == name and r.finish_reason != "cancelled"]
            met = sum(1 for r in mine if self._slo_met(r))
            classes[name] = {
                "ttft_target_s": ttft_target, "tpot_target_s": tpot_target, "requests": len(mine),
                "attained": met, "attainment": (met / len(mine)) if mine else None,
                "failed": sum(1 for r in mine if r.failed),
                "cancelled": sum(1 for r in recent if r.slo_class == name and r.finish_reason == "cancelled"),
                "ttft": _percentiles([r.ttft_s for r in mine if r.ttft_s is not None]),
                "tpot": _percentiles([r.tpot_s for r in mine if r.tpot_s is not None]),
            }
        return {"window_s": self.window_s, "requests_total": self.requests_total,
                "requests_active": len(self.requests), "classes": classes}

    def snapshot(self) -> dict:
        with self._lock:
            self._fold()
            now = self.clock()
            instances = []
            stopped = [r for r in self.instances.values() if r.stopped_at is not None]
            shown_stopped = {r.instance_id for r in sorted(stopped, key=lambda r: r.stopped_at)[-50:]}
            for rec in self.instances.values():
                if rec.stopped_at is not None and rec.instance_id not in shown_stopped:
                    continue  # billed still, but the feed lists only the 50 newest stopped
                left = None
                if rec.stopped_at is None and rec.last_used is not None:
                    left = max(0.0, rec.keep_alive_s - (now - rec.last_used))
                instances.append({
                    "instance_id": rec.instance_id, "function_id": rec.function_id, "node": rec.node,
                    "state": rec.state, "memory_gb": rec.memory_gb, "experts": rec.experts,
                    "replica": rec.replica, "keep_alive_left_s": left, "invocations": rec.invocations,
                    "rows": rec.rows,
                    "started_at": rec.started_at, "stopped_at": rec.stopped_at, "path": rec.path,
                    "stop_reason": rec.stop_reason, "cgroup": rec.cgroup, "cgroup_skipped": rec.cgroup_skipped,
                    "pid": rec.pid, "endpoint": rec.endpoint, "stages": dict(rec.stages),
                })
            load = None
            if self.load is not None:
                load = {"layers": int(self.load.shape[0]), "experts": int(self.load.shape[1]),
                        "counts": self.load.tolist()}
            return {
                "time": now, "uptime_s": now - self.started, "policy": self.policy,
                "billing": self._billing(now), "slo": self._slo(now),
                "stragglers": {"recent": list(self.stragglers)[-50:],
                               "imbalance": {str(k): v for k, v in sorted(self.imbalance.items())}},
                "nodes": list(self.nodes), "instances": instances,
                "cold_starts": list(self.cold_starts)[-50:], "deaths": list(self.deaths)[-50:],
                "load": load, "rounds": self.rounds, "data_plane": dict(self.data_plane),
                "main": {"memory_gb": self.main_memory_gb, "device": self.main_device,
                         "held_bytes": self.main_held_bytes, "experts": self.main_experts},
            }

    # -- read-out for mesh/prometheus.py (issue 13): per-instance ledger ------------------------

    def instance_ledger(self) -> list[dict]:
        """One row per instance still held in detail, plus a row for the main function
        (function_id "main", node "coordinator"): what it has been billed so far.

        row: instance_id, function_id, node, path, state, ready_at (None: not ready yet),
             stages {stage: s}, gb_s, cost (dollars; in invocation mode the per-request fee of
             its invocations included, and the main row carries the per-request fee of requests)
        Instances folded into `retired` are not listed: mesh/prometheus.py keeps their last row.
        """
        with self._lock:
            self._fold()
            now = self.clock()
            fee = self.prices.per_million_requests / 1e6 if self.prices.mode == "invocation" else 0.0
            rows = []
            for rec in self.instances.values():
                gb_s = self._instance_gb_s(rec, now)
                rate = self.prices.gpu_gb_s if rec.device == "gpu" else self.prices.cpu_gb_s
                rows.append({"instance_id": rec.instance_id, "function_id": rec.function_id, "node": rec.node,
                             "path": rec.path, "state": rec.state, "ready_at": rec.ready_at,
                             "stages": dict(rec.stages), "gb_s": gb_s,
                             "cost": gb_s * rate + rec.invocations * fee})
            main_rate = self.prices.gpu_gb_s if _on_gpu(self.main_device) else self.prices.cpu_gb_s
            main_gb_s = self._main_gb_s(now)
            rows.append({"instance_id": "main", "function_id": "main", "node": "coordinator", "path": "",
                         "state": "warm", "ready_at": None, "stages": {}, "gb_s": main_gb_s,
                         "cost": main_gb_s * main_rate + self.requests_total * fee})
            return rows
