"""Pipelined scatter-gather: the `ExpertExecutor` that runs a MoE layer's experts across the mesh.

One call of `run(block, dispatch)` is one scatter-gather round:

    group active experts by owner ──► split each function's rows evenly over its r warm
                                       replicas (honouring the micro-batch size and the
                                       payload cap): one ExpertCall per chunk
                                  ──► compute local experts while the calls are in flight
                                  ──► gather replies (zmq.Poller, one DEALER per instance)
                                  ──► late / failed / dead: retry on another replica, else
                                       compute in the main function: from its own copy if
                                       it holds one (billed), else loaded on demand (a billed
                                       cold start on the critical path, see main_experts.py)
                                  ──► one RoundRecord to the meter (no lock taken here)

It runs on the engine thread as a plain loop (DESIGN.md: asyncio costs ~2x per round here);
the sockets belong to that thread alone. The rows it returns are exactly the dispatch's rows
in order, whoever computed them, so policies change cost and latency, never tokens.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import torch
import zmq

from allocator.capacity import capacity_drop
from mesh.errors import ProtocolError
from mesh.functions import Instance, Registry, State, Version
from mesh.main_experts import MainExperts
from mesh.meter import Meter, Reply, RoundRecord
from mesh.protocol import ExpertCall, ExpertResult, WorkerError, decode, encode
from mesh.shm import SHM_MIN_BYTES, ShmPools
from mesh.sockets import harden
from mesh.staging import Staging
from nodes.model.moe import Dispatch, MoEBlock, counts_by_segment, run_experts

log = logging.getLogger("moemesh.executor")


@dataclass(frozen=True)
class ScatterSettings:
    call_timeout_s: float = 5.0  # a reply later than this is given up on (then retried / local)
    cold_start_wait_s: float = 30.0  # how long a call waits for a function that is still starting
    cold_start: str = "wait"  # "wait" for a cold function, or "load" its experts into the main function
    retries: int = 1  # other replicas tried before computing locally
    micro_batch_tokens: int = 0  # rows per call (0: only the payload cap splits)
    payload_cap_bytes: int = 6 * 1024 * 1024  # AWS Lambda's synchronous payload cap
    poll_slice_s: float = 0.02  # how often a waiting gather re-checks health where the registry has no wake fd
    shm_min_bytes: int = SHM_MIN_BYTES  # rows of a call to a worker on this host from this size go through shm (0: never)
    security: object = None  # the MeshConfig whose [security] keys the data sockets use (None: plain)


@dataclass
class Chunk:
    """One ExpertCall: some rows of some experts of one function.

    pieces: the row ranges [start, stop) of the dispatch it carries, in call order (one per
    expert, or part of one). Most chunks are a single contiguous range (a function's experts'
    rows sit together in the sorted dispatch): then `span` is that slice and the rows go out
    as a view of the dispatch and come back with one slice copy, no index tensors at all.
    """

    function_id: str
    expert_ids: list[int]
    counts: list[int]
    pieces: list[tuple[int, int]]
    attempt: int = 0
    instance: Instance | None = None
    sent_at: float = 0.0
    deadline: float = 0.0  # perf_counter() after which its reply is given up on
    call_id: int = 0
    _index: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def span(self) -> slice | None:
        """The chunk's rows as one slice, if they are contiguous."""
        start, stop = self.pieces[0][0], self.pieces[0][1]
        for a, b in self.pieces[1:]:
            if a != stop:
                return None
            stop = b
        return slice(start, stop)

    @property
    def rows(self) -> torch.Tensor:
        """[n] int64 row indices into the dispatch."""
        if self._index is None:
            self._index = torch.cat([torch.arange(a, b) for a, b in self.pieces])
        return self._index


class MeshExecutor:
    def __init__(self, registry: Registry, meter: Meter, settings: ScatterSettings,
                 context: zmq.Context | None = None, main: MainExperts | None = None) -> None:
        self.registry = registry
        self.meter = meter
        self.main = main  # the main function's experts (None: every expert held, e.g. in tests)
        self.settings = settings
        self.context = context or zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}
        self.staging = Staging()  # pinned host blocks for the rows of remote calls (plain ones on a CPU)
        # big calls (prefill) to workers on this host: rows through shared memory (mesh/shm.py)
        self.shm = ShmPools(enabled=settings.shm_min_bytes > 0, min_call_bytes=settings.shm_min_bytes or 1)
        self._call_ids = itertools.count(1)
        self.request_ids: list[str] = []  # requests in the current step (for the meter)
        # (request id, first row, end row, "prefill" | "decode") of the current step's flat batch
        self.segments: list[tuple[str, int, int, str]] = []
        # request id -> phase -> [layers, experts] token-slot counts (the activation traces)
        self.activations: dict[str, dict[str, torch.Tensor]] = {}
        self._segment_of_token = torch.zeros(0, dtype=torch.long)
        self._step_counts: torch.Tensor | None = None
        self.num_moe_layers = 0
        self.call_bounds: dict[str, float] = {}  # function id -> its longest expected call, s (planning.call_bounds)
        self._due = math.inf  # the earliest deadline among the gather's pending calls, or earlier
        self._record: RoundRecord | None = None  # the round in progress
        self._seen_generation = -1
        # functions that have had a warm instance, by id and experts: a re-plan may give an id others
        self._seen_warm: set[Version] = set()
        # layer -> [rounds, seconds, calls, bytes sent, slowest compute, scatter seconds, summed compute]
        # (remote rounds only)
        self.rounds: dict[int, list] = {}
        # seconds spent in MoE rounds (every round, local or remote, cold waits included): what a
        # step less these took is its dense work (EngineLoop.dense_steps)
        self.round_s = 0.0
        self._cold_sent_at = 0.0  # when the round in progress last called a function it waited for

    # -- sockets -----------------------------------------------------------------------------

    def _socket(self, inst: Instance) -> zmq.Socket:
        sock = self.sockets.get(inst.instance_id)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            harden(sock, "data", self.settings, connect=inst.endpoint)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(inst.endpoint)
            self.sockets[inst.instance_id] = sock
        return sock

    def between_steps(self) -> None:
        """At a step boundary: free the shared memory a step's calls used; once per registry
        change, close sockets of instances that are gone and drop main-function experts that a
        warm function now serves."""
        if self.shm.pools:
            self.shm.trim()
        generation = self.registry.generation
        if generation == self._seen_generation:
            return
        self._seen_generation = generation
        self.prune()
        if self.main is not None:
            self.main.reconcile(self._served_warm)

    def _served_warm(self, expert: tuple[int, int]) -> bool:
        owner = self.registry.owner_of(expert)
        return owner is not None and bool(self.registry.serving(owner)[0])

    def prune(self) -> None:
        """Close sockets of instances that are gone."""
        for instance_id in list(self.sockets):
            if self.registry.state_of(instance_id) not in (State.WARM,):
                self.sockets.pop(instance_id).close(linger=0)
                self.shm.drop(instance_id)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        self.shm.close()

    # -- one round -------------------------------------------------------------------------------

    def run(self, block: MoEBlock, plan: Dispatch) -> torch.Tensor:
        self._record_activations(plan)
        capacity_factor = self.registry.plan.capacity_factor if self.registry.plan else 0.0
        if capacity_factor > 0:  # MoEless's capacity-factor baseline: the one policy that changes tokens
            kept = capacity_drop(plan.counts.numpy(), capacity_factor)
            if (kept < plan.counts.numpy()).any():
                offsets = plan.offsets
                rows = torch.cat([torch.arange(offsets[e], offsets[e] + int(n)) for e, n in enumerate(kept)])
                sub = Dispatch(plan.layer, plan.x[rows], plan.token[rows], plan.weight[rows],
                               torch.as_tensor(kept, dtype=torch.long), plan.num_tokens)
                y = torch.zeros_like(plan.x)  # a dropped slot contributes nothing: the residual carries it
                dropped = int(plan.x.shape[0] - len(rows))
                y[rows] = self._round(block, sub, plan.counts, dropped)
                return y
        return self._round(block, plan, plan.counts)

    def _round(self, block: MoEBlock, plan: Dispatch, routed: torch.Tensor, dropped: int = 0) -> torch.Tensor:
        """One scatter-gather round over `plan`'s rows; routed: [experts] slots the gate chose."""
        start = time.perf_counter()
        layer = plan.layer
        rec = self._record = RoundRecord(layer, self.num_moe_layers or layer + 1, routed.numpy(),
                                         list(self.request_ids), dropped=dropped, at=self.meter.clock())
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        for e in plan.active_experts():
            owner = self.registry.owner_of((layer, e))
            (local if owner is None else remote.setdefault(owner, [])).append(e)

        y = torch.zeros_like(plan.x)
        pending: dict[int, Chunk] = {}
        fallback: list[Chunk] = []
        cold: dict[str, list[int]] = {}  # functions still cold-starting: sent from the gather once warm
        sent_rows = 0
        for function_id, experts in remote.items():
            warm, wait = self._replicas(function_id, layer, experts)
            if wait:
                cold[function_id] = experts
                continue
            sent_rows += self._scatter(function_id, experts, warm, plan, layer, pending, fallback)

        if local:  # overlap: local experts compute while remote calls are in flight
            self._hold(layer, local)
            run_experts(block.experts, plan, local, out=y)  # disjoint rows: written in place

        scattered = self._cold_sent_at = time.perf_counter()
        sent_rows += self._gather(plan, layer, pending, y, fallback, cold)
        if rec.waited_for:  # idle from the end of its own work until the last cold function could be called
            rec.cold_wait_s = max(0.0, self._cold_sent_at - scattered)
        for chunk in fallback:  # in the main function: its own (billed) copy, else loaded on demand
            rec.fallbacks += 1
            self._hold(layer, chunk.expert_ids)
            self._local(block, plan, chunk, y)
        rec.seconds = time.perf_counter() - start
        self.round_s += rec.seconds
        self.meter.post(rec)
        self._record = None
        if remote and not rec.waited_for:  # rounds that waited for a cold start would skew the mean
            acc = self.rounds.setdefault(layer, [0, 0.0, 0, 0, 0.0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += rec.seconds
            acc[2] += rec.calls
            acc[3] += sent_rows * plan.x.shape[1] * plan.x.element_size()
            acc[4] += max((r.compute_s for r in rec.replies), default=0.0)
            acc[5] += scattered - start
            acc[6] += sum(r.compute_s for r in rec.replies)
        return y

    def _replicas(self, function_id: str, layer: int, experts: list[int]) -> tuple[list[Instance], bool]:
        """(the function's warm instances, healthiest first; whether to wait for its cold start).

        A function still cold-starting is waited for (in the gather, beside the other calls'
        replies) unless the main function holds all these experts, the function was warm
        before (a replacement after a failure), or [functions] cold_start = "load": then its
        rows run in the main function (loaded on demand, billed) and no batch waits for a process.
        """
        warm, starting = self.registry.serving(function_id)
        if warm:
            self._seen_warm.add(warm[0].version)
        if warm or not starting:
            return warm, False
        if self.main is not None and (self.settings.cold_start == "load"
                                      or self.registry.version(function_id) in self._seen_warm
                                      or all(self.main.holds((layer, e)) for e in experts)):
            return [], False
        return [], True

    def _scatter(self, function_id: str, experts: list[int], warm: list[Instance], plan: Dispatch, layer: int,
                 pending: dict[int, Chunk], fallback: list[Chunk]) -> int:
        """Send a function's rows, split over its warm replicas; rows sent (or left to the main)."""
        chunks = self._chunks(function_id, experts, plan, max(1, len(warm)))
        for i, chunk in enumerate(chunks):
            if not warm or not self._send(chunk, warm[i % len(warm)], plan, layer, pending):
                fallback.append(chunk)
        return sum(c.n for c in chunks)

    def _hold(self, layer: int, experts: list[int]) -> None:
        """Make sure the main function holds these experts; a load here is on the critical path."""
        if self.main is None:
            return
        missing = [(layer, e) for e in experts if not self.main.holds((layer, e))]
        if not missing:
            return
        loaded, seconds = self.main.load(missing, on_demand=True)
        if loaded:
            self._record.on_demand.append({
                "time": time.time(), "instance_id": "main", "function_id": "main", "node": "main",
                "path": "on-demand", "experts": [list(e) for e in loaded], "stages": {"weights": seconds},
                "total_s": seconds})

    def set_segments(self, segments: list[tuple[str, int, int, str]]) -> None:
        """The step's requests: (request id, first row, end row, "prefill" | "decode")."""
        self.flush_activations()
        self.segments = segments
        lengths = torch.tensor([stop - start for _, start, stop, _ in segments], dtype=torch.long)
        self._segment_of_token = torch.repeat_interleave(torch.arange(len(segments)), lengths)  # [T]
        self._step_counts = None

    def _record_activations(self, plan: Dispatch) -> None:
        """One bincount per layer into the step's [requests, layers, experts] buffer."""
        if not self.segments or len(self._segment_of_token) != plan.num_tokens:
            return
        counts = counts_by_segment(plan, self._segment_of_token, len(self.segments))  # [requests, E]
        if self._step_counts is None:
            layers = self.num_moe_layers or plan.layer + 1
            self._step_counts = torch.zeros(len(self.segments), layers, counts.shape[1], dtype=torch.long)
        self._step_counts[:, plan.layer] += counts

    def flush_activations(self) -> None:
        """Add the finished step's counts to each request's prefill or decode matrix."""
        if self._step_counts is None:
            return
        for (rid, _, _, phase), counts in zip(self.segments, self._step_counts, strict=True):
            phases = self.activations.setdefault(rid, {})
            phases[phase] = phases[phase] + counts if phase in phases else counts.clone()
        self._step_counts = None

    def take_activation(self, request_id: str, layers: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefill, decode) [layers, experts] counts of a finished request; forgets them."""
        self.flush_activations()
        phases = self.activations.pop(request_id, {})
        empty = torch.zeros(layers, experts, dtype=torch.long)
        return phases.get("prefill", empty), phases.get("decode", empty)

    def round_summary(self) -> dict[str, dict]:
        """Per MoE layer: mean scatter-gather round time, calls and bytes per round, the slowest
        worker's own compute per round (part of the floor), all workers' compute summed (what
        one core would have to run in turn) and the time to scatter (send the calls and compute
        the local experts) before the gather starts."""
        return {str(layer): {"rounds": n, "mean_round_s": t / n, "calls_per_round": c / n, "bytes_per_round": b / n,
                             "slowest_compute_s": slow / n, "scatter_s": sc / n, "summed_compute_s": total / n}
                for layer, (n, t, c, b, slow, sc, total) in sorted(dict(self.rounds).items()) if n}

    def _chunks(self, function_id: str, experts: list[int], plan: Dispatch, replicas: int = 1) -> list[Chunk]:
        """Split a function's rows into calls: at most micro_batch_tokens rows and the payload cap
        each, and at least one call per warm replica when there are rows enough (replicas share a
        round's rows evenly, as the planner assumes)."""
        row_bytes = plan.x.shape[1] * plan.x.element_size()
        cap = max(1, self.settings.payload_cap_bytes // row_bytes - 1)
        per_layer = self.registry.plan.micro_batch_tokens if self.registry.plan else ()
        micro = per_layer[plan.layer] if plan.layer < len(per_layer) else self.settings.micro_batch_tokens
        if micro:  # the plan's per-layer knob, else policy.micro_batch_tokens
            cap = min(cap, micro)
        offsets = plan.offsets
        if replicas > 1:
            total = sum(offsets[e + 1] - offsets[e] for e in experts)
            cap = min(cap, max(1, -(-total // replicas)))  # ceil(total / replicas)
        chunks: list[Chunk] = []
        ids: list[int] = []
        counts: list[int] = []
        pieces: list[tuple[int, int]] = []
        size = 0
        for e in experts:
            start, stop = offsets[e], offsets[e + 1]
            while start < stop:
                take = min(stop - start, cap - size)
                ids.append(e)
                counts.append(take)
                pieces.append((start, start + take))
                size += take
                start += take
                if size == cap:
                    chunks.append(Chunk(function_id, ids, counts, pieces))
                    ids, counts, pieces, size = [], [], [], 0
        if size:
            chunks.append(Chunk(function_id, ids, counts, pieces))
        return chunks

    def _retry_target(self, chunk: Chunk) -> Instance | None:
        """Another warm replica than the one that failed (waits for none)."""
        warm, _ = self.registry.serving(chunk.function_id)
        others = [i for i in warm if chunk.instance is None or i.instance_id != chunk.instance.instance_id]
        return others[0] if others else None

    def _send(self, chunk: Chunk, inst: Instance, plan: Dispatch, layer: int, pending: dict[int, Chunk]) -> bool:
        call_id = next(self._call_ids)
        span = chunk.span
        cpu_span = span is not None and plan.x.device.type == "cpu"
        # big rows to a worker on this host: gathered into a shared-memory slot, only a descriptor sent
        msg = self.shm.call(inst.instance_id, inst.endpoint, call_id, layer, chunk.expert_ids, chunk.counts,
                            *((plan.x[span], None) if cpu_span else (plan.x, chunk.rows)))
        if msg is None:
            # a contiguous CPU range goes out as a view (sent zero-copy or copied once by ZeroMQ);
            # else the rows are gathered into a staging block (pinned, off the GPU, on a CUDA host)
            x = plan.x[span] if cpu_span else self.staging.to_host(plan.x, chunk.rows)
            msg = ExpertCall(call_id=call_id, layer=layer, expert_ids=chunk.expert_ids, counts=chunk.counts, x=x)
        try:
            self._socket(inst).send_multipart(encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.shm.release(call_id)
            log.warning("call to %s not sent (%s); computing in the main function", inst.instance_id, exc)
            return False
        chunk.instance, chunk.sent_at, chunk.call_id = inst, time.perf_counter(), call_id
        chunk.deadline = chunk.sent_at + max(self.settings.call_timeout_s, self.call_bounds.get(chunk.function_id, 0.0))
        self._due = min(self._due, chunk.deadline)
        self._record.shm_calls += msg.x_shm is not None
        pending[call_id] = chunk
        self._record.calls += 1
        return True

    def _gather(self, plan: Dispatch, layer: int, pending: dict[int, Chunk], y: torch.Tensor,
                fallback: list[Chunk], cold: dict[str, list[int]]) -> int:
        """Take replies until every call is answered, failed or given up on, and send the rows
        of `cold` functions as soon as each is warm (or leave them to the main function once it
        failed or cold_start_wait_s passed). Sleeps in one poll over the calls' sockets and the
        registry's wake fd: a reply or a registry change (an instance warm or gone) wakes it,
        nothing else does; without a wake fd it re-checks every poll_slice_s. Each call is given
        up on at its own deadline: sent_at + the larger of call_timeout_s and its function's
        longest expected call (call_bounds), so a call sent late to a function that was cold
        gets its whole timeout. Returns the rows sent to cold functions."""
        now = time.perf_counter()
        self._due = min((c.deadline for c in pending.values()), default=math.inf)  # <= every pending deadline
        cold_deadline = now + self.settings.cold_start_wait_s
        poller = zmq.Poller()
        for sock in {id(self.sockets[c.instance.instance_id]): self.sockets[c.instance.instance_id]
                     for c in pending.values()}.values():
            poller.register(sock, zmq.POLLIN)
        wake = self.registry.wake_fd
        if wake is not None:
            poller.register(wake, zmq.POLLIN)
        slice_s = self.settings.call_timeout_s if wake is not None else self.settings.poll_slice_s
        generation = self.registry.generation
        sent = self._send_cold(cold, plan, layer, pending, fallback, poller, now >= cold_deadline)
        while pending or cold:
            now = time.perf_counter()
            left = min(self._due, cold_deadline if cold else math.inf) - now
            if left <= 0:
                if now >= self._due:
                    for call_id, chunk in list(pending.items()):
                        if chunk.deadline <= now:
                            self._record.late += 1
                            self._failed(pending.pop(call_id), "no reply within its timeout (policy.call_timeout_s)",
                                         plan, layer, pending, fallback, poller)
                    self._due = min((c.deadline for c in pending.values()), default=math.inf)
                sent += self._send_cold(cold, plan, layer, pending, fallback, poller, now >= cold_deadline)
                continue
            events = poller.poll(max(1, int(min(left, slice_s) * 1000 + 0.999)))
            for sock, _ in events:
                if sock is wake:
                    self.registry.drain_wake()
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._reply(frames, pending, y, plan, layer, fallback, poller)
            if self.registry.generation != generation or not events:  # an instance warm, or gone
                generation = self.registry.generation
                for call_id, chunk in list(pending.items()):  # a dead instance will never answer
                    if self.registry.state_of(chunk.instance.instance_id) is not State.WARM:
                        pending.pop(call_id)
                        self._failed(chunk, "instance is gone", plan, layer, pending, fallback, poller)
                sent += self._send_cold(cold, plan, layer, pending, fallback, poller, False)
        return sent

    def _send_cold(self, cold: dict[str, list[int]], plan: Dispatch, layer: int, pending: dict[int, Chunk],
                   fallback: list[Chunk], poller: zmq.Poller, give_up: bool) -> int:
        """Send the rows of cold functions that are warm now; with give_up (or once a function
        has nothing starting any more) leave its rows to the main function."""
        sent = 0
        for function_id in list(cold):
            warm, starting = self.registry.serving(function_id)
            if not warm and starting and not give_up:
                continue
            experts = cold.pop(function_id)
            if warm:
                self._seen_warm.add(warm[0].version)
                self._record.waited_for.append(warm[0].instance_id)
                self._cold_sent_at = time.perf_counter()
                log.info("a round waited for the cold start of %s", function_id)
            before = set(pending)
            sent += self._scatter(function_id, experts, warm, plan, layer, pending, fallback)
            for call_id in set(pending) - before:
                poller.register(self.sockets[pending[call_id].instance.instance_id], zmq.POLLIN)
        return sent

    def _reply(self, frames, pending, y, plan, layer, fallback, poller) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed reply: %s", exc)
            return
        call_id = getattr(msg, "call_id", -1)
        chunk = pending.pop(call_id, None)
        if chunk is None:
            self.shm.release(call_id)  # a late reply to a call already given up on: its slot is free again
            return
        inst = chunk.instance
        try:
            y_host = self.shm.result(msg) if isinstance(msg, ExpertResult) else None  # frame, or its shm slot
        except ProtocolError as exc:
            y_host, msg = None, WorkerError(call_id, exc.code, exc.message)
        if y_host is not None and tuple(y_host.shape) == (chunk.n, plan.x.shape[1]):
            latency = time.perf_counter() - chunk.sent_at
            span = chunk.span
            if span is not None and y.device.type == "cpu":
                y[span] = y_host  # one slice copy out of the frame or slot (cast to y's dtype if needed)
            else:
                self.staging.to_device(y_host, y, chunk.rows)
            self.shm.release(call_id)
            inst.suspect = 0
            self._record.replies.append(Reply(inst.instance_id, chunk.function_id, latency, msg.compute_s, chunk.n))
            return
        self.shm.release(call_id)  # an error reply: the worker is done with the slot
        if isinstance(msg, WorkerError) and msg.code == "shm_unavailable":  # that worker cannot map ours:
            self.shm.disable(inst.instance_id, msg.message)  # frames from now on, and this call again
            if self._send(chunk, inst, plan, layer, pending):
                return
        reason = f"{msg.code}: {msg.message}" if isinstance(msg, WorkerError) else f"unexpected {type(msg).__name__}"
        self._failed(chunk, reason, plan, layer, pending, fallback, poller)

    def _failed(self, chunk, reason, plan, layer, pending, fallback, poller) -> None:
        self.shm.forget(chunk.call_id)  # given up on: a late reply may still write its slot
        inst = chunk.instance
        inst.suspect += 1
        log.warning("call to %s (layer %d, experts %s) failed: %s", inst.instance_id, layer,
                    chunk.expert_ids, reason)
        target = self._retry_target(chunk) if chunk.attempt < self.settings.retries else None
        if target is not None:
            chunk.attempt += 1
            self._record.retries += 1
            if self._send(chunk, target, plan, layer, pending):
                sock = self.sockets[chunk.instance.instance_id]
                poller.register(sock, zmq.POLLIN)
                return
        fallback.append(chunk)

    @staticmethod
    def _local(block: MoEBlock, plan: Dispatch, chunk: Chunk, y: torch.Tensor) -> None:
        """Compute a chunk's rows in the main function, into y."""
        for e, (a, b) in zip(chunk.expert_ids, chunk.pieces, strict=True):
            y[a:b] = block.experts[e](plan.x[a:b])
