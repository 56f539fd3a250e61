"""Pipelined scatter-gather: the `ExpertExecutor` that runs a MoE layer's experts across the mesh.

One call of `run(block, dispatch)` is one scatter-gather round:

    group active experts by owner ──► scatter: ExpertCall per micro-batch (payload-capped),
                                       spread over the function's warm replicas
                                  ──► compute local experts while the calls are in flight
                                  ──► gather replies (zmq.Poller, one DEALER per instance)
                                  ──► late / failed / dead: retry on another replica, else
                                       compute locally from the main model's copy

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

from mesh.errors import ProtocolError
from mesh.functions import Instance, Registry, State
from mesh.meter import Meter
from mesh.protocol import ExpertCall, ExpertResult, WorkerError, decode, encode
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
                 context: zmq.Context | None = None) -> None:
        self.registry = registry
        self.meter = meter
        self.settings = settings
        self.context = context or zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}
        self._call_ids = itertools.count(1)
        self.request_ids: list[str] = []  # requests in the current step (for the meter)
        # (request id, first row, end row, "prefill" | "decode") of the current step's flat batch
        self.segments: list[tuple[str, int, int, str]] = []
        # request id -> phase -> [layers, experts] token-slot counts (the activation traces)
        self.activations: dict[str, dict[str, torch.Tensor]] = {}
        self._segment_of_token = torch.zeros(0, dtype=torch.long)
        self._step_counts: torch.Tensor | None = None
        self.num_moe_layers = 0
        self.stats = {"calls": 0, "fallbacks": 0, "retries": 0, "late": 0}
        self._waited = False
        self.rounds: dict[int, list] = {}  # layer -> [rounds, seconds, calls, bytes sent] (remote rounds only)

    # -- sockets -----------------------------------------------------------------------------

    def _socket(self, inst: Instance) -> zmq.Socket:
        sock = self.sockets.get(inst.instance_id)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(inst.endpoint)
            self.sockets[inst.instance_id] = sock
        return sock

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
        start = time.perf_counter()
        self._waited = False
        layer = plan.layer
        self.meter.layer_load(layer, plan.counts.numpy(), self.num_moe_layers or layer + 1)
        self._record_activations(plan)
        local: list[int] = []
        remote: dict[str, list[int]] = {}
        for e in plan.active_experts():
            owner = self.registry.owner_of((layer, e))
            (local if owner is None else remote.setdefault(owner, [])).append(e)

        y = torch.zeros_like(plan.x)
        pending: dict[int, Chunk] = {}
        fallback: list[Chunk] = []
        pending_all: list[Chunk] = []
        for function_id, experts in remote.items():
            for chunk in self._chunks(function_id, experts, plan):
                pending_all.append(chunk)
                if not self._send(chunk, plan, layer, pending):
                    fallback.append(chunk)

        if local:  # overlap: local experts compute while remote calls are in flight
            run_experts(block.experts, plan, local, out=y)  # disjoint rows: written in place

        replies = self._gather(plan, layer, pending, y, fallback)
        for chunk in fallback:  # computed from the main model's copy: same rows, same maths
            self.stats["fallbacks"] += 1
            y[chunk.rows] = self._local(block, plan, chunk)
        self.meter.scatter_round(layer, replies)
        self.meter.request_calls(self.request_ids, len(replies), len(fallback))
        if remote and not self._waited:  # rounds that waited for a cold start would skew the mean
            sent = sum(len(c.rows) for c in pending_all) * plan.x.shape[1] * plan.x.element_size()
            acc = self.rounds.setdefault(layer, [0, 0.0, 0, 0])
            acc[0] += 1
            acc[1] += time.perf_counter() - start
            acc[2] += len(pending_all)
            acc[3] += sent
        return y

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

    def _chunks(self, function_id: str, experts: list[int], plan: Dispatch) -> list[Chunk]:
        """Split a function's rows into calls of at most micro_batch_tokens rows and the payload cap."""
        row_bytes = plan.x.shape[1] * plan.x.element_size()
        cap = max(1, self.settings.payload_cap_bytes // row_bytes - 1)
        per_layer = self.registry.plan.micro_batch_tokens if self.registry.plan else ()
        micro = per_layer[plan.layer] if plan.layer < len(per_layer) else self.settings.micro_batch_tokens
        if micro:  # the plan's per-layer knob, else policy.micro_batch_tokens
            cap = min(cap, micro)
        chunks: list[Chunk] = []
        ids: list[int] = []
        counts: list[int] = []
        rows: list[torch.Tensor] = []
        size = 0
        offsets = plan.offsets
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

    def _pick(self, chunk: Chunk, index: int) -> Instance | None:
        warm, starting = self.registry.serving(chunk.function_id)
        if not warm and starting:
            start = time.monotonic()
            warm = self.registry.wait_warm(chunk.function_id, self.settings.cold_start_wait_s)
            self._waited = True
            if warm:
                log.info("waited %.3f s for a cold start of %s", time.monotonic() - start, chunk.function_id)
                self.meter.cold_start_on_path(warm[0].instance_id, self.request_ids)
        if chunk.instance is not None:  # a retry: another replica than the one that failed
            warm = [i for i in warm if i.instance_id != chunk.instance.instance_id]
        return warm[index % len(warm)] if warm else None

    def _send(self, chunk: Chunk, plan: Dispatch, layer: int, pending: dict[int, Chunk]) -> bool:
        inst = self._pick(chunk, len(pending))
        if inst is None:
            return False
        call_id = next(self._call_ids)
        msg = ExpertCall(call_id=call_id, layer=layer, expert_ids=chunk.expert_ids, counts=chunk.counts,
                         x=plan.x[chunk.rows].contiguous())
        try:
            self._socket(inst).send_multipart(encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("call to %s not sent (%s); computing locally", inst.instance_id, exc)
            return False
        chunk.instance, chunk.sent_at = inst, time.perf_counter()
        pending[call_id] = chunk
        self.stats["calls"] += 1
        return True

    def _gather(self, plan: Dispatch, layer: int, pending: dict[int, Chunk], y: torch.Tensor,
                fallback: list[Chunk]) -> list[tuple[str, str, float]]:
        replies: list[tuple[str, str, float]] = []
        deadline = time.perf_counter() + self.settings.call_timeout_s
        poller = zmq.Poller()
        for sock in {id(self.sockets[c.instance.instance_id]): self.sockets[c.instance.instance_id]
                     for c in pending.values()}.values():
            poller.register(sock, zmq.POLLIN)
        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                for call_id in list(pending):
                    self.stats["late"] += 1
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
                    self._reply(frames, pending, y, replies, plan, layer, fallback, poller)
            for call_id, chunk in list(pending.items()):  # a dead instance will never answer
                if self.registry.state_of(chunk.instance.instance_id) is not State.WARM:
                    pending.pop(call_id)
                    self._failed(chunk, "instance is gone", plan, layer, pending, fallback, poller)
        return replies

    def _reply(self, frames, pending, y, replies, plan, layer, fallback, poller) -> None:
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
            y[chunk.rows] = msg.y.to(y.dtype)
            inst.suspect = 0
            replies.append((inst.instance_id, chunk.function_id, latency))
            self.meter.invocation(inst.instance_id, latency, msg.compute_s)
            return
        reason = f"{msg.code}: {msg.message}" if isinstance(msg, WorkerError) else f"unexpected {type(msg).__name__}"
        self._failed(chunk, reason, plan, layer, pending, fallback, poller)

    def _failed(self, chunk, reason, plan, layer, pending, fallback, poller) -> None:
        inst = chunk.instance
        inst.suspect += 1
        log.warning("call to %s (layer %d, experts %s) failed: %s", inst.instance_id, layer,
                    chunk.expert_ids, reason)
        if chunk.attempt < self.settings.retries:
            chunk.attempt += 1
            self.stats["retries"] += 1
            if self._send(chunk, plan, layer, pending):
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
