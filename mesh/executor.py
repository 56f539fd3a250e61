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
import time
from dataclasses import dataclass

import torch
import zmq

from allocator.capacity import capacity_drop
from mesh.errors import ProtocolError
from mesh.functions import Instance, Registry, State
from mesh.main_experts import MainExperts
from mesh.meter import Meter, Reply, RoundRecord
from mesh.protocol import ExpertCall, ExpertResult, WorkerError, decode, encode
from mesh.sockets import harden
from mesh.staging import Staging
from nodes.model.moe import Dispatch, MoEBlock, counts_by_segment, run_experts

log = logging.getLogger("moemesh.executor")


@dataclass(frozen=True)
class ScatterSettings:
    call_timeout_s: float = 5.0  # a reply later than this is given up on (then retried / local)
    cold_start_wait_s: float = 30.0  # how long a call waits for a function that is still starting
    retries: int = 1  # other replicas tried before computing locally
    micro_batch_tokens: int = 0  # rows per call (0: only the payload cap splits)
    payload_cap_bytes: int = 6 * 1024 * 1024  # AWS Lambda's synchronous payload cap
    poll_slice_s: float = 0.02  # how often a waiting gather re-checks instance health
    security: object = None  # the MeshConfig whose [security] keys the data sockets use (None: plain)


@dataclass
class Chunk:
    """One ExpertCall: some rows of some experts of one function."""

    function_id: str
    expert_ids: list[int]
    counts: list[int]
    rows: torch.Tensor  # [n] int64 row indices into the dispatch
    attempt: int = 0
    instance: Instance | None = None
    sent_at: float = 0.0


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
        self._call_ids = itertools.count(1)
        self.request_ids: list[str] = []  # requests in the current step (for the meter)
        # (request id, first row, end row, "prefill" | "decode") of the current step's flat batch
        self.segments: list[tuple[str, int, int, str]] = []
        # request id -> phase -> [layers, experts] token-slot counts (the activation traces)
        self.activations: dict[str, dict[str, torch.Tensor]] = {}
        self._segment_of_token = torch.zeros(0, dtype=torch.long)
        self._step_counts: torch.Tensor | None = None
        self.num_moe_layers = 0
        self._record: RoundRecord | None = None  # the round in progress
        self._seen_generation = -1
        self._seen_warm: set[str] = set()  # functions that have had a warm instance
        self.rounds: dict[int, list] = {}  # layer -> [rounds, seconds, calls, bytes sent] (remote rounds only)

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
        """At a step boundary, once per registry change: close sockets of instances that are gone
        and drop main-function experts that a warm function now serves."""
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

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()

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
                                         list(self.request_ids), dropped=dropped)
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        for e in plan.active_experts():
            owner = self.registry.owner_of((layer, e))
            (local if owner is None else remote.setdefault(owner, [])).append(e)

        y = torch.zeros_like(plan.x)
        pending: dict[int, Chunk] = {}
        fallback: list[Chunk] = []
        sent_rows = 0
        for function_id, experts in remote.items():
            warm = self._replicas(function_id, layer, experts)
            chunks = self._chunks(function_id, experts, plan, max(1, len(warm)))
            for i, chunk in enumerate(chunks):
                if not warm or not self._send(chunk, warm[i % len(warm)], plan, layer, pending):
                    fallback.append(chunk)
            sent_rows += sum(len(c.rows) for c in chunks)

        if local:  # overlap: local experts compute while remote calls are in flight
            self._hold(layer, local)
            run_experts(block.experts, plan, local, out=y)  # disjoint rows: written in place

        self._gather(plan, layer, pending, y, fallback)
        for chunk in fallback:  # in the main function: its own (billed) copy, else loaded on demand
            rec.fallbacks += 1
            self._hold(layer, chunk.expert_ids)
            y[chunk.rows] = self._local(block, plan, chunk)
        rec.seconds = time.perf_counter() - start
        self.meter.post(rec)
        self._record = None
        if remote and not rec.waited_for:  # rounds that waited for a cold start would skew the mean
            acc = self.rounds.setdefault(layer, [0, 0.0, 0, 0])
            acc[0] += 1
            acc[1] += rec.seconds
            acc[2] += rec.calls
            acc[3] += sent_rows * plan.x.shape[1] * plan.x.element_size()
        return y

    def _replicas(self, function_id: str, layer: int, experts: list[int]) -> list[Instance]:
        """The function's warm instances, healthiest first. A function still cold-starting is
        waited for, unless the main function holds all these experts (then they run there)."""
        warm, starting = self.registry.serving(function_id)
        if warm:
            self._seen_warm.add(function_id)
        if warm or not starting:
            return warm
        if self.main is not None and (function_id in self._seen_warm
                                      or all(self.main.holds((layer, e)) for e in experts)):
            return []  # a replacement after a failure, or experts the main holds: no batch waits
        start = time.monotonic()
        warm = self.registry.wait_warm(function_id, self.settings.cold_start_wait_s)
        if warm:
            log.info("waited %.3f s for a cold start of %s", time.monotonic() - start, function_id)
            self._record.waited_for.append(warm[0].instance_id)
        return warm

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
        """Per MoE layer: mean scatter-gather round time, calls and bytes per round."""
        return {str(layer): {"rounds": n, "mean_round_s": t / n, "calls_per_round": c / n, "bytes_per_round": b / n}
                for layer, (n, t, c, b) in sorted(dict(self.rounds).items()) if n}

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
        rows: list[torch.Tensor] = []
        size = 0
        for e in experts:
            start, stop = offsets[e], offsets[e + 1]
            while start < stop:
                take = min(stop - start, cap - size)
                ids.append(e)
                counts.append(take)
                rows.append(torch.arange(start, start + take))
                size += take
                start += take
                if size == cap:
                    chunks.append(Chunk(function_id, ids, counts, torch.cat(rows)))
                    ids, counts, rows, size = [], [], [], 0
        if size:
            chunks.append(Chunk(function_id, ids, counts, torch.cat(rows)))
        return chunks

    def _retry_target(self, chunk: Chunk) -> Instance | None:
        """Another warm replica than the one that failed (waits for none)."""
        warm, _ = self.registry.serving(chunk.function_id)
        others = [i for i in warm if chunk.instance is None or i.instance_id != chunk.instance.instance_id]
        return others[0] if others else None

    def _send(self, chunk: Chunk, inst: Instance, plan: Dispatch, layer: int, pending: dict[int, Chunk]) -> bool:
        call_id = next(self._call_ids)
        msg = ExpertCall(call_id=call_id, layer=layer, expert_ids=chunk.expert_ids, counts=chunk.counts,
                         x=self.staging.to_host(plan.x, chunk.rows))
        try:
            self._socket(inst).send_multipart(encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("call to %s not sent (%s); computing in the main function", inst.instance_id, exc)
            return False
        chunk.instance, chunk.sent_at = inst, time.perf_counter()
        pending[call_id] = chunk
        self._record.calls += 1
        return True

    def _gather(self, plan: Dispatch, layer: int, pending: dict[int, Chunk], y: torch.Tensor,
                fallback: list[Chunk]) -> None:
        deadline = time.perf_counter() + self.settings.call_timeout_s
        poller = zmq.Poller()
        for sock in {id(self.sockets[c.instance.instance_id]): self.sockets[c.instance.instance_id]
                     for c in pending.values()}.values():
            poller.register(sock, zmq.POLLIN)
        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                for call_id in list(pending):
                    self._record.late += 1
                    self._failed(pending.pop(call_id), "no reply within call_timeout_s", plan, layer,
                                 pending, fallback, poller)
                deadline = time.perf_counter() + self.settings.call_timeout_s
                continue
            events = dict(poller.poll(int(min(left, self.settings.poll_slice_s) * 1000)))
            for sock in events:
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._reply(frames, pending, y, plan, layer, fallback, poller)
            for call_id, chunk in list(pending.items()):  # a dead instance will never answer
                if self.registry.state_of(chunk.instance.instance_id) is not State.WARM:
                    pending.pop(call_id)
                    self._failed(chunk, "instance is gone", plan, layer, pending, fallback, poller)

    def _reply(self, frames, pending, y, plan, layer, fallback, poller) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed reply: %s", exc)
            return
        chunk = pending.pop(getattr(msg, "call_id", -1), None)
        if chunk is None:
            return  # a reply to a call already given up on
        inst = chunk.instance
        if isinstance(msg, ExpertResult) and tuple(msg.y.shape) == (len(chunk.rows), plan.x.shape[1]):
            latency = time.perf_counter() - chunk.sent_at
            self.staging.to_device(msg.y, y, chunk.rows)
            inst.suspect = 0
            self._record.replies.append(Reply(inst.instance_id, chunk.function_id, latency, msg.compute_s,
                                              len(chunk.rows)))
            return
        reason = f"{msg.code}: {msg.message}" if isinstance(msg, WorkerError) else f"unexpected {type(msg).__name__}"
        self._failed(chunk, reason, plan, layer, pending, fallback, poller)

    def _failed(self, chunk, reason, plan, layer, pending, fallback, poller) -> None:
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
    def _local(block: MoEBlock, plan: Dispatch, chunk: Chunk) -> torch.Tensor:
        out, start = [], 0
        for e, n in zip(chunk.expert_ids, chunk.counts, strict=True):
            out.append(block.experts[e](plan.x[chunk.rows[start:start + n]]))
            start += n
        return torch.cat(out)
