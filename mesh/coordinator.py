"""The coordinator: admits requests, plans, warms functions, runs the main model, publishes metrics.

    client DEALER ──► frontend ROUTER ─┐                    ┌─► engine thread (EngineLoop):
    node DEALER   ──► control ROUTER  ─┼─ asyncio (this) ───┤   continuous batching, MoE layers
                      metrics PUB  ◄───┘                    │   scatter-gather over ZeroMQ
                                                            └─► (MeshExecutor, own sockets)

The asyncio side owns the three sockets above and a reconcile loop that, each tick, updates
small managers with isolated failures: node liveness (Paranoid Pirate: ping every interval,
expire after `liveness` silent intervals; a dead node's instances fail and `_warm` re-places
its functions on the live nodes), instances (spawn what the plan lacks), metrics. Every
NodeHeartbeat is reconciled with the registry (`_reconcile`): hung instances are retired,
ghosts (instances a node runs that the registry does not hold live there, e.g. after a
re-register or a coordinator restart) are stopped, instances a node stopped listing fail.
A daemon that registers with a new pid lost its old instances with its old process. A dropped
control connection (a killed daemon) gets every node pinged at once, and a node silent for
DROP_WINDOW_S after it is dead (`_watch_drops`): about a second, not `liveness` heartbeats.
Run it with `python -m mesh.coordinator --config-json JSON`; `mesh-up` does that for you. It
prints one line `MOEMESH_READY {json endpoints}` on stdout when it is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zmq
import zmq.asyncio

from allocator import keepalive as keep_alive
from allocator.plan import FunctionSpec, Plan
from mesh import planning
from mesh.config import MeshConfig, resolve_model_path
from mesh.control import bind_control, register_ack, spawn_request
from mesh.device import move_model, resolve_device
from mesh.engine_loop import Admit, Cancel, EngineLoop, Failed, Finished, Token
from mesh.errors import MeshError, ProtocolError, RequestRejected, Timeout
from mesh.executor import MeshExecutor, ScatterSettings
from mesh.functions import Registry, State
from mesh.main_experts import MainExperts
from mesh.meter import Meter, Prices
from mesh.metrics_http import MetricsService
from mesh.protocol import (
    CancelRequest,
    GenerateRequest,
    InstanceReady,
    InstanceStopped,
    MetricsSnapshot,
    NodeHeartbeat,
    NodeRegister,
    Ping,
    Pong,
    RequestDone,
    Shutdown,
    SpawnFailed,
    StatusReply,
    StatusRequest,
    StopFunction,
    TokenEvent,
    decode,
    encode,
    error_reply_for,
)
from mesh.sockets import harden
from mesh.trace import make_record, predictor_shape, prompt_features, trace_meta
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from nodes.model.skew import apply_zipf
from nodes.model.tokenizer import Tokenizer
from predictor.evaluate import default_predictors
from predictor.forecast import Activation
from predictor.traces import TraceStore

log = logging.getLogger("moemesh.coordinator")

# Policies whose plan does not depend on a forecast: planned once, never re-planned.
FIXED_POLICIES = ("all-local", "all-remote", "static-split", "cpu-only", "gpu-only", "fetch", "lambdaml",
                  "cpu-cluster", "static-ep", "capacity-factor")

# A warm instance whose serving loop has been silent this long is retired even if its daemon has
# not flagged it (the daemon flags and kills it after its own hung_after_s, 2 s by default).
HUNG_BACKSTOP_S = 6.0
DROP_WINDOW_S = 1.0  # after a control connection drops, a node silent this long is dead
GHOST_RETRY_S = 5.0  # a ghost still reported this long after its StopFunction is asked again
REUSE_WINDOW = 16  # admissions whose rate sets a plan's expected reuse (planning.expected_reuse)


@dataclass
class Node:
    name: str
    kind: str
    host: str
    capacity_gb: float
    cpus: float
    last_seen: float
    alive: bool = True
    resources: dict = field(default_factory=dict)
    pid: int = 0  # the daemon's pid: a new one on re-register means its instances died with the old
    missing: dict[str, int] = field(default_factory=dict)  # instance id -> heartbeats it was absent from
    ghosts: dict[str, float] = field(default_factory=dict)  # instance id -> when we asked to stop it


class Coordinator:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.context = zmq.asyncio.Context()
        self.model_path = resolve_model_path(config.model.path)
        self.checkpoint = Checkpoint(self.model_path, dtype=getattr(torch, config.model.dtype))
        model_config = self.checkpoint.config
        slo = {name: (c.ttft_s, c.tpot_s) for name, c in config.slo.classes.items()}
        billing = config.billing
        self.meter = Meter(
            Prices(billing.mode, billing.price_cpu_gb_s, billing.price_gpu_gb_s,
                   billing.price_per_million_requests, billing.bill_init, billing.round_ms),
            slo, straggler_k=config.meter.straggler_k,
        )
        self.registry = Registry()
        self.since_plan = 0
        self.arrivals: deque[float] = deque(maxlen=REUSE_WINDOW)  # admission times (planning.expected_reuse)
        self.admitted = 0
        self.guard_tripped = False  # the meter guard (see _guarded_config)
        self.loading: Plan | None = None  # a re-plan loading its local experts, not yet in force (_warm)
        # Memory held = memory billed: the main function holds the non-expert weights and only the
        # experts its plan keeps local (loaded below, once the plan is made).
        self.model = self.checkpoint.load_model(experts=())
        apply_zipf(self.model, config.model.routing_zipf)  # [model] routing_zipf: MoEless's skewed loads
        self.device = resolve_device(config.coordinator.device)  # ConfigError if cuda is asked for but absent
        self.model = move_model(self.model, self.device)
        # profiles read once; the main function's dense work timed on the model itself
        self.profiles = planning.running_profiles(planning.profiles_of(config, model_config), self.model)
        self.measured_profiles = self.profiles  # as measured; self.profiles adds the data plane's own rounds
        self.workload = planning.DEFAULT_WORKLOAD  # what the plan in force was sized for
        self.cluster = planning.cluster_of(config)
        start = time.perf_counter()
        self.plan = planning.make_plan(config, model_config, profiles=self.profiles)
        self.plan_s = time.perf_counter() - start  # what the last plan took to make (_replan_skip)
        self.baseline_main_gb = planning.all_local_main_gb(config, model_config, self.profiles)
        self.main = MainExperts(self.model, self.checkpoint, self._main_changed)
        self.main.load(self.plan.local, pin=True)
        self._main_changed(self.main.held_bytes(), len(self.main.held()))
        self.meter.policy = planning.describe(self.plan)
        self.tokenizer = Tokenizer.from_dir(self.model_path) if (self.model_path / "tokenizer.json").exists() else None
        self.predictor = self._make_predictor()
        self.traces = self._open_traces()
        self.features: dict[str, object] = {}  # request id -> PromptFeatures, until it finishes
        settings = ScatterSettings(
            call_timeout_s=config.policy.call_timeout_s, retries=config.policy.retries,
            micro_batch_tokens=config.policy.micro_batch_tokens, payload_cap_bytes=config.policy.payload_cap_bytes,
            shm_min_bytes=config.policy.shm_min_bytes,
            cold_start_wait_s=config.functions.cold_start_wait_s, cold_start=config.functions.cold_start,
            security=config,
        )
        self.executor = MeshExecutor(self.registry, self.meter, settings, zmq.Context(), main=self.main)
        self.executor.num_moe_layers = self.model.config.num_moe_layers
        self._adopt(self.plan)
        self.engine = Engine(self.model, self.executor, max_batch=config.coordinator.max_batch)
        self.nodes: dict[str, Node] = {}
        self.drops: list[float] = []  # when a control-socket peer dropped its connection, to judge (_tick)
        self.clients: dict[str, bytes] = {}  # request id -> client identity
        self.events: asyncio.Queue = asyncio.Queue()
        self.loop_thread: EngineLoop | None = None
        self.stopping = asyncio.Event()
        self.records: dict[str, dict] = {}
        self.prompts: dict[str, str] = {}
        self.deadlines: dict[str, float] = {}  # request id -> when it fails with Timeout
        self.timed_out: set[str] = set()
        self.spawn_failures: dict[tuple[str, int], tuple[int, float]] = {}  # (fn, replica) -> (count, last)
        self.unplaced: set[tuple[str, int]] = set()  # (fn, replica) no live node can host: warned once, not every tick

    # -- predictor, plans, traces ----------------------------------------------------------------

    def _main_changed(self, held_bytes: int, experts: int) -> None:
        """Bill the main function for what it holds (at least the size its plan reserved)."""
        gb = max(self.plan.main.memory_gb,
                 planning.main_billed_gb(held_bytes, self.config, self.profiles, self.workload))
        self.meter.main_held(held_bytes, experts)
        self.meter.set_main(gb, self.plan.main.device, self.baseline_main_gb)

    def _make_predictor(self):
        shape = predictor_shape(self.model)
        gates = np.stack([b.gate.weight.detach().float().cpu().numpy() for b in self.model.moe_blocks()])  # [L, E, d]
        predictor = default_predictors(shape, seed=0, gate_weights=gates, names=[self.config.predictor.name])[0]
        if self.config.predictor.traces:
            records = list(TraceStore.open(self.config.predictor.traces))
            predictor.fit(records)
            log.info("predictor %s learned from %d traces in %s", predictor.name, len(records),
                     self.config.predictor.traces)
        return predictor

    def _open_traces(self) -> TraceStore | None:
        path = self.config.predictor.record_dir
        if not path:
            return None
        if (Path(path) / "meta.json").exists():
            return TraceStore.open(path)
        return TraceStore.create(path, trace_meta(self.model, self.model_path.name))

    @property
    def adaptive(self) -> bool:
        """Policies that plan from a forecast (the baselines' plans never change)."""
        return self.config.policy.name not in FIXED_POLICIES

    def _plan_for(self, request_id: str, features, prompt_tokens: int, new_tokens: int, slo_class: str) -> None:
        """At admission, off the event loop: forecast the request once, re-plan from the forecast
        when the policy adapts, a batch window is due and (moemesh) the re-plan can pay for
        itself, and record the planner's estimate of the plan in force beside what the meter
        will measure."""
        from allocator.model import WarmInstance, Workload

        workload = Workload(max(1, prompt_tokens), max(1, new_tokens))
        self.arrivals.append(time.monotonic())
        self.admitted += 1
        try:
            forecast = self.predictor.forecast(features)
        except Exception as exc:  # e.g. the oracle asked about a prompt it has not seen
            log.warning("predictor %s could not forecast (%s); keeping the plan in force",
                        self.config.predictor.name, exc)
            return
        warm = [WarmInstance(i.function_id, i.experts, i.memory_gb, i.node) for i in self.registry.warm_instances()]
        # what a re-plan decides with: instances still starting count as kept, their INIT already
        # paid whichever plan wins (counted cold, a plan that keeps them was charged their INIT a
        # second time and lost to one that throws them away); the recorded estimate keeps them
        # cold, as the meter bills their INIT to this request
        live = [WarmInstance(i.function_id, i.experts, i.memory_gb, i.node) for i in self.registry.live_instances()]
        # the per-call time of the mesh's own scatter-gather rounds and the dense work of its own
        # steps, once seen (planning.calibrated_profiles)
        steps = self.loop_thread.dense_steps() if self.loop_thread else ()
        self.profiles = planning.calibrated_profiles(self.measured_profiles, self.executor.round_summary(), steps)
        due = self._replan_due()
        if self._guard_trips():  # the meter overrules the estimator now, not at the next re-plan
            due = True
        gated = due and self._replans_gated()
        # the plan in force's estimate: recorded when it stays, or what the gate weighs
        estimate = self._estimate(forecast, workload, warm) if gated or not due else None
        if due:
            kept = estimate if len(live) == len(warm) else self._estimate(forecast, workload, live)
            skip = self._replan_skip(kept, workload, slo_class) if gated else None
            if skip:
                log.debug("%s: %s", request_id, skip)
                self.meter.policy = {**planning.describe(self.plan, forecast), "kept": skip}
            else:
                held = frozenset(self.main.held())
                self._replan(forecast, workload, live, slo_class, held)
                # the re-plan's loads into the main are this request's, on its TTFT and billed
                estimate = self._estimate(forecast, workload, warm, main_held=held)
        self.meter.request_estimate(request_id, estimate)

    def _replans_gated(self) -> bool:
        """moemesh ([policy] replan_if_it_pays) re-plans only when it can pay (_replan_skip)."""
        policy = self.config.policy
        return policy.name == "moemesh" and policy.replan_if_it_pays and not self.guard_tripped

    def _replan_skip(self, estimate: dict | None, workload, slo_class: str) -> str | None:
        """Why a due re-plan would cost more than it can save, or None to make it."""
        target = self.config.slo.classes[slo_class]
        return planning.replan_skip_reason(estimate, self.plan, self.profiles, self.cluster, workload,
                                           (target.ttft_s, target.tpot_s), self.plan_s)

    def _replan_due(self) -> bool:
        replan_every = self.config.policy.replan_every
        self.since_plan += 1
        return self.adaptive and not ((replan_every == 0 and self.since_plan > 1) or
                                      (replan_every and (self.since_plan - 1) % replan_every))

    def _replan(self, forecast, workload, warm, slo_class: str | None = None, held=None) -> None:
        """Plan from the forecast, for the request's SLO class (the one it is served and judged
        under); load what the plan keeps local before it names it local."""
        start = time.perf_counter()
        try:
            plan = planning.make_plan(self._guarded_config(), self.model.config, forecast, workload, warm=warm,
                                      profiles=self.profiles, reuse=self._reuse(), slo_class=slo_class,
                                      in_force=self.plan, main_held=self.main.held() if held is None else held)
        except Exception as exc:  # a policy that cannot plan keeps the plan in force
            log.warning("policy %s could not plan (%s); keeping the plan in force", self.config.policy.name, exc)
            return
        self.plan_s = time.perf_counter() - start
        self.loading = plan  # while it loads, _warm starts no function this plan drops
        try:
            loaded, seconds = self.main.load(plan.local, pin=True)  # before the plan names them local
            self.plan, self.workload = plan, workload
            self._adopt(plan)  # experts now remote are dropped once a warm function serves them
        finally:
            self.loading = None
        self._main_changed(self.main.held_bytes(), len(self.main.held()))
        if loaded:  # billed at the size it grew to
            self.meter.main_loaded(loaded, seconds, "re-plan")
        self.meter.policy = planning.describe(plan, forecast)
        log.info("re-planned with %s in %.1f ms: %d local experts, %d functions (forecast by %s, confidence %.2f)%s",
                 plan.policy, (time.perf_counter() - start) * 1e3, len(plan.local), len(plan.functions),
                 forecast.source, forecast.confidence, planning.reasons(plan))

    def _reuse(self) -> float:
        """Requests a plan's cold starts are expected to serve (planning.expected_reuse), from
        the arrival rate of the last REUSE_WINDOW admissions and the keep-alive ("none": 1), at
        most the requests admitted so far."""
        f = self.config.functions
        keep_alive_s = 0.0 if f.keep_alive_policy == "none" else f.keep_alive_s
        return planning.expected_reuse(self.arrivals, keep_alive_s, self.admitted)

    def _adopt(self, plan) -> None:
        """The plan's functions are what the registry spawns and the executor calls, each with its
        longest expected call (planning.call_bounds), which the executor waits for."""
        bounds = planning.call_bounds(plan, self.profiles, self.config)
        slow = {f: b for f, b in bounds.items() if b > self.config.policy.call_timeout_s}
        if slow:
            log.info("%d functions may compute a call for longer than policy.call_timeout_s = %.1f s: their replies "
                     "are waited for up to %.1f s (%.0f x the profile's time of their biggest call)", len(slow),
                     self.config.policy.call_timeout_s, max(slow.values()), planning.CALL_BOUND_FACTOR)
        self.executor.call_bounds = bounds
        self.registry.set_plan(plan)

    def _guarded_config(self) -> MeshConfig:
        """The meter overrules the estimator: once the `moemesh` policy has cost more on the meter
        than the all-local baseline for the same traffic (after 2 requests), it plans all-local
        from then on ([policy] meter_guard = false turns this off; _guard_trips, at admission,
        decides)."""
        if not self.guard_tripped:
            return self.config
        policy = self.config.policy
        return dataclasses.replace(self.config, policy=dataclasses.replace(policy, name="all-local"))

    def _guard_trips(self) -> bool:
        """Whether the meter guard trips now (once; checked at every admission, so the re-plan
        to all-local is made for the next request, not at the policy's next re-plan: with
        keep-alive "none" the moemesh layout cold-started its functions for 16 requests before)."""
        policy = self.config.policy
        if policy.name != "moemesh" or not policy.meter_guard or self.guard_tripped or len(self.meter.finished) < 2:
            return False
        billing = self.meter.billing()
        baseline = billing.get("baseline_all_local_cost")
        if not baseline or billing["cost"] <= baseline:
            return False
        self.guard_tripped = True
        log.warning("meter guard: %s so far cost $%.3g against $%.3g for all-local on the same traffic; "
                    "planning all-local from now on (the estimator misjudged this model on this host; "
                    "[policy] meter_guard = false to keep planning with it)", policy.name, billing["cost"], baseline)
        return True

    def _estimate(self, forecast, workload, warm, main_held=None) -> dict | None:
        """The planner's figures for a request under the plan in force (its forecast, the warm
        instances now, the main function already up, holding what it holds now or ``main_held``,
        what it held before a re-plan loaded the rest), recorded beside what the meter measures."""
        from allocator.cost import Loads, estimate

        try:
            loads = Loads.from_forecast(forecast, workload, self.profiles.shape.top_k)
            held = self.main.held() if main_held is None else main_held
            return estimate(self.plan, loads, self.profiles, self.cluster, workload, warm=warm, main_held=held).summary()
        except Exception as exc:  # an estimate is for the record: never fail a request over it
            log.warning("no planner estimate for this request (%s)", exc)
            return None

    def _learn(self, request_id: str, text: str, activation) -> None:
        features = self.features.pop(request_id, None)
        if features is None or activation is None:
            return
        prefill, decode = (a.numpy() for a in activation)
        try:
            self.predictor.observe(features, Activation(prefill, decode))
            if self.traces is not None:
                self.traces.append(make_record(self.model, request_id, text, features.token_ids.tolist(),
                                               features.expected_new_tokens, prefill, decode))
        except Exception:
            log.exception("learning from request %s failed (serving goes on)", request_id)

    # -- sockets -----------------------------------------------------------------------------

    def _bind(self, kind: int, port: int, role: str) -> tuple[zmq.asyncio.Socket, str]:
        sock = self.context.socket(kind)
        harden(sock, role, self.config, bind=f"tcp://{self.config.coordinator.host}:{port}")
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if kind == zmq.PUB:
            sock.setsockopt(zmq.SNDHWM, 8)  # a slow dashboard drops snapshots, never slows us
        sock.bind(f"tcp://{self.config.coordinator.host}:{port}")
        return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve(self, ready_file: Path | None = None) -> None:
        c = self.config.coordinator
        self.frontend, client_ep = self._bind(zmq.ROUTER, c.client_port, "client")
        self.control, control_ep = bind_control(self.context, self.config, c.host, c.control_port)
        self.metrics, metrics_ep = self._bind(zmq.PUB, c.metrics_port, "metrics")
        self.endpoints = {"client": client_ep, "control": control_ep, "metrics": metrics_ep}
        self.exporter = MetricsService(self)  # Prometheus /metrics, /v1/experts/distribution (issue 13)
        self.endpoints["http_metrics"] = await self.exporter.start(c.host, c.resolved_metrics_http_port())
        loop = asyncio.get_running_loop()
        self.loop_thread = EngineLoop(self.engine, self.executor, self.tokenizer, self.meter,
                                      lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))
        self.loop_thread.start()
        line = json.dumps(self.endpoints)
        print(f"MOEMESH_READY {line}", flush=True)
        if ready_file:
            ready_file.write_text(line)
        log.info("coordinator up: %s (policy %s, %d remote functions)", line, self.plan.policy,
                 len(self.plan.functions))
        tasks = [asyncio.create_task(t) for t in (self._frontend(), self._control(), self._events(), self._tick())]
        await self.stopping.wait()
        await self._shutdown()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        for name in list(self.nodes):
            await self._to_node(name, Shutdown(reason="coordinator shutting down"))
        if self.loop_thread:
            self.loop_thread.stop()
            await asyncio.to_thread(self.loop_thread.join, 5)
        for sock in (self.frontend, self.control, self.metrics):
            sock.close(linger=0)
        self.executor.close()
        await self.exporter.close()

    # -- client edge ---------------------------------------------------------------------------

    async def _reply(self, identity: bytes, msg) -> None:
        await self.frontend.send_multipart([identity, *encode(msg)], copy=False)

    async def _frontend(self) -> None:
        while True:
            identity, *frames = await self.frontend.recv_multipart(copy=False)
            identity = identity.bytes
            msg = None
            try:
                msg = decode(frames)
                await self._client_message(identity, msg)
            except MeshError as exc:  # ProtocolError, RequestRejected: the caller gets it typed
                log.warning("client %r: %s", identity, exc)
                await self._reply(identity, error_reply_for(exc, getattr(msg, "request_id", None)))
            except Exception as exc:  # never let one bad message take the coordinator down
                log.exception("client message failed")
                await self._reply(identity, error_reply_for(exc))

    async def _client_message(self, identity: bytes, msg) -> None:
        if isinstance(msg, Ping):
            await self._reply(identity, Pong(seq=msg.seq))
        elif isinstance(msg, StatusRequest):
            await self._reply(identity, StatusReply(status=self.status()))
        elif isinstance(msg, GenerateRequest):
            await self._admit(identity, msg)
        elif isinstance(msg, CancelRequest):
            if msg.request_id in self.clients:
                self.loop_thread.inbox.put(Cancel(msg.request_id))
        else:
            raise RequestRejected(f"{type(msg).__name__} is not a client message",
                                  code="bad_request", hint="send GenerateRequest, CancelRequest, StatusRequest or Ping")

    async def _admit(self, identity: bytes, req: GenerateRequest) -> None:
        slo_class = self.config.slo.default_class if req.slo_class == "default" else req.slo_class
        if slo_class not in self.config.slo.classes:
            raise RequestRejected(f"unknown SLO class {req.slo_class!r}", code="unknown_slo_class",
                                  hint=f"use one of {sorted(self.config.slo.classes)} ([slo.classes] in launch.toml)")
        if req.request_id in self.clients:
            raise RequestRejected(f"request id {req.request_id!r} is already running", code="bad_request",
                                  hint="use a fresh request_id")
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
        elif self.tokenizer is None:
            raise RequestRejected("this model has no tokenizer.json: send prompt_ids", code="bad_request")
        else:
            ids = self.tokenizer.encode(req.prompt)
        vocab = self.model.config.vocab_size
        if not ids or max(ids) >= vocab:
            raise RequestRejected(f"prompt must have 1+ tokens with ids < {vocab}", code="bad_request")
        if req.max_new_tokens < 1:
            raise RequestRejected("max_new_tokens must be >= 1", code="bad_request")
        params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little"),
                                stop_at_eos=req.stop_at_eos)
        self.clients[req.request_id] = identity
        self.deadlines[req.request_id] = time.time() + self.config.coordinator.request_timeout_s
        self.meter.request_admitted(req.request_id, slo_class, len(ids))
        features = prompt_features(self.model, ids, req.max_new_tokens, req.prompt)
        self.features[req.request_id] = features
        self.prompts[req.request_id] = req.prompt
        # forecast, planning and the estimate off the event loop: sockets and heartbeats keep flowing
        await asyncio.to_thread(self._plan_for, req.request_id, features, len(ids), req.max_new_tokens, slo_class)
        self._warm()  # cold starts overlap the prompt's first layers
        self.loop_thread.inbox.put(Admit(req.request_id, ids, params))
        self.exporter.admitted(req.request_id)

    async def _events(self) -> None:
        while True:
            event = await self.events.get()
            identity = self.clients.get(event.request_id)
            if identity is None:
                continue
            if isinstance(event, Token):
                self.meter.token(event.request_id)
                await self._reply(identity, TokenEvent(request_id=event.request_id, index=event.index,
                                                       token_id=event.token_id, text=event.text))
            elif isinstance(event, Finished) and event.request_id in self.timed_out and \
                    event.finish_reason == "cancelled":
                del self.clients[event.request_id]
                self.timed_out.discard(event.request_id)
                self.deadlines.pop(event.request_id, None)
                self._keep_record(self.meter.request_done(event.request_id, "timeout"))
                limit = self.config.coordinator.request_timeout_s
                await self._reply(identity, error_reply_for(Timeout(
                    f"request {event.request_id} ran past coordinator.request_timeout_s = {limit:g} s "
                    f"after {event.generated_tokens} tokens"), event.request_id))
            elif isinstance(event, Finished):
                del self.clients[event.request_id]
                self.deadlines.pop(event.request_id, None)
                self.timed_out.discard(event.request_id)
                record = self.meter.request_done(event.request_id, event.finish_reason)
                if event.activation is not None:
                    record["activation"] = {"prefill": event.activation[0].tolist(),
                                            "decode": event.activation[1].tolist()}
                self._keep_record(record)
                self._learn(event.request_id, self.prompts.pop(event.request_id, ""), event.activation)
                await self._reply(identity, RequestDone(
                    request_id=event.request_id, finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens, generated_tokens=event.generated_tokens,
                    ttft_s=record.get("ttft_s") or 0.0, tpot_s=record.get("tpot_s") or 0.0, record=record))
            elif isinstance(event, Failed):
                del self.clients[event.request_id]
                self.deadlines.pop(event.request_id, None)
                self.features.pop(event.request_id, None)
                self.prompts.pop(event.request_id, None)
                self._keep_record(self.meter.request_done(event.request_id, "error"))
                await self._reply(identity, error_reply_for(event.error, event.request_id))

    def _keep_record(self, record: dict) -> None:
        if not record:
            return
        self.exporter.finished(record)  # adds the request's gb_s / cost_usd shares, observes it
        self.records[record["request_id"]] = record
        if len(self.records) > 10_000:
            self.records.pop(next(iter(self.records)))
        record_dir = self.config.meter.record_dir
        if record_dir:
            path = Path(record_dir)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{record['request_id']}.json").write_text(json.dumps(record, indent=1))

    # -- control plane -------------------------------------------------------------------------

    async def _to_node(self, name: str, msg) -> None:
        await self.control.send_multipart([name.encode(), *encode(msg)], copy=False)

    async def _control(self) -> None:
        watcher = asyncio.get_running_loop().create_task(self._watch_drops())
        watcher.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                                  log.error("the control socket's monitor failed", exc_info=t.exception()))
        while True:
            identity, *frames = await self.control.recv_multipart(copy=False)
            name = identity.bytes.decode(errors="replace")
            try:
                await self._node_message(name, decode(frames))
            except ProtocolError as exc:
                log.warning("dropped a malformed control message from %r: %s", name, exc)
            except Exception:
                log.exception("control message from %r failed", name)

    async def _node_message(self, name: str, msg) -> None:
        now = time.time()
        node = self.nodes.get(name)
        if node is not None:
            node.last_seen, node.alive = now, True
        if isinstance(msg, NodeRegister):
            if node is not None and node.pid != msg.pid:  # a new daemon: the old one's instances died with it
                self._lose_instances(name, now, f"node {name} restarted (daemon pid {node.pid} -> {msg.pid})")
            self.nodes[name] = Node(name, msg.kind, msg.host, msg.capacity_gb, msg.cpus, now, pid=msg.pid)
            await self._to_node(name, register_ack(name, self.config))
            log.info("node %s registered (%s, %.1f GB)", name, msg.kind, msg.capacity_gb)
        elif node is None:
            log.warning("message %s from unregistered node %r: dropped", type(msg).__name__, name)
        elif isinstance(msg, NodeHeartbeat):
            node.resources = dict(msg.resources)
            self._reconcile(node, msg.instances, now)
        elif isinstance(msg, InstanceReady):
            inst = self.registry.transition(msg.instance_id, State.WARM, endpoint=msg.endpoint, pid=msg.pid)
            if inst is None:
                return
            self.spawn_failures.pop((inst.function_id, inst.replica), None)
            self.meter.instance_ready(msg.instance_id, msg.started_at, dict(msg.stages), msg.cgroup, msg.cgroup_skipped,
                                     msg.pid, msg.endpoint)
            log.info("%s warm on %s in %.3f s %s", msg.instance_id, name, sum(msg.stages.values()),
                     {k: round(v, 4) for k, v in msg.stages.items()})
        elif isinstance(msg, SpawnFailed):
            inst = self.registry.transition(msg.instance_id, State.FAILED)
            if inst is not None:
                key = (inst.function_id, inst.replica)
                self.spawn_failures[key] = (self.spawn_failures.get(key, (0, 0.0))[0] + 1, now)
            self.meter.instance_stopped(msg.instance_id, now, "failed")
            log.error("spawn of %s on %s failed: %s", msg.instance_id, name, msg.error)
        elif isinstance(msg, InstanceStopped):
            state = State.FAILED if msg.reason in ("died", "failed") else State.STOPPED
            self.registry.transition(msg.instance_id, state)
            self.meter.instance_stopped(msg.instance_id, msg.stopped_at, msg.reason, msg.started_at)
            log.log(logging.WARNING if state is State.FAILED else logging.INFO, "%s stopped on %s: %s (exit %s)",
                    msg.instance_id, name, msg.reason, msg.exit_code)
        elif isinstance(msg, Pong | Ping):
            pass

    async def _watch_drops(self) -> None:
        """A peer of the control socket dropped its TCP connection (a daemon killed or gone):
        ping every live node at once; _tick marks dead any that has said nothing DROP_WINDOW_S
        after the drop. A killed daemon is so found in about a second instead of `liveness`
        heartbeats; a cut link drops no connection and waits for the liveness rule."""
        monitor = self.control.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                await monitor.recv_multipart()
                self.drops.append(time.time())
                for node in [n for n in self.nodes.values() if n.alive]:
                    await self._to_node(node.name, Ping(seq=0))
        finally:
            monitor.close(linger=0)

    def _judge_drops(self, now: float) -> None:
        """Nodes silent since a dropped connection, DROP_WINDOW_S on: dead (see _watch_drops)."""
        while self.drops and now - self.drops[0] > DROP_WINDOW_S:
            dropped = self.drops.pop(0)
            for node in self.nodes.values():
                if node.alive and node.last_seen < dropped:
                    self._mark_dead(node, now, f"node {node.name} dropped its connection and has been "
                                               f"silent for {now - dropped:.1f} s since")

    def _mark_dead(self, node: Node, now: float, why: str) -> None:
        node.alive = False  # its functions are re-placed on the others by _warm
        self._lose_instances(node.name, now, why)
        log.error("%s: marked dead", why)

    def _reconcile(self, node: Node, reported: list, now: float) -> None:
        """Make the registry and a node's heartbeat agree (heartbeat instances: dicts with at
        least "instance_id", "state"; "hung" / "heartbeat_age_s" from the daemon's watchdog).

        - a live instance the daemon reports hung, or whose serving loop has not answered for
          HUNG_BACKSTOP_S: retired (FAILED, metered as a death, the daemon told to kill it);
        - an instance the node runs but the registry does not hold live there (a ghost: left
          from before a re-register or a coordinator restart): stopped, re-asked every
          GHOST_RETRY_S while it is still reported;
        - an instance the registry holds live on the node but two heartbeats in a row do not
          list (and older than one heartbeat): lost, FAILED and metered as a death.
        """
        listed: set[str] = set()
        for item in reported:
            if not isinstance(item, dict) or not isinstance(item.get("instance_id"), str):
                continue
            iid = item["instance_id"]
            listed.add(iid)
            inst = self.registry.instances.get(iid)
            if inst is None or inst.node != node.name or not inst.live:
                if item.get("state") == "stopping" or now - node.ghosts.get(iid, -1e9) < GHOST_RETRY_S:
                    continue
                node.ghosts[iid] = now
                log.warning("%s runs on %s but is not the coordinator's (a ghost): stopping it", iid, node.name)
                asyncio.get_running_loop().create_task(self._to_node(node.name, StopFunction(iid, "ghost")))
                continue
            age = item.get("heartbeat_age_s")
            hung = item.get("hung") is True or (
                inst.state is State.WARM and isinstance(age, int | float) and age > HUNG_BACKSTOP_S)
            if hung:
                self._retire_hung(inst, node.name, age, now)
        for iid in [i for i in node.ghosts if i not in listed]:
            del node.ghosts[iid]
        grace = self.config.coordinator.heartbeat_s
        for inst in self.registry.live_on(node.name):
            if inst.instance_id in listed or now - inst.requested_at < grace:
                node.missing.pop(inst.instance_id, None)
                continue
            count = node.missing[inst.instance_id] = node.missing.get(inst.instance_id, 0) + 1
            if count >= 2 and self.registry.transition(inst.instance_id, State.FAILED) is not None:
                node.missing.pop(inst.instance_id, None)
                self.meter.instance_stopped(inst.instance_id, now, "died")
                log.error("%s: %s no longer reports it; marked failed", inst.instance_id, node.name)

    def _retire_hung(self, inst, node: str, age, now: float) -> None:
        """A hung instance: FAILED now (its in-flight calls fail over), the daemon kills it."""
        if self.registry.transition(inst.instance_id, State.FAILED) is None:
            return
        self.meter.instance_stopped(inst.instance_id, now, "hung")  # the meter counts it a death
        log.error("%s on %s hung (serving loop silent for %s s): retired, its calls fail over",
                  inst.instance_id, node, age)
        asyncio.get_running_loop().create_task(self._to_node(node, StopFunction(inst.instance_id, "hung")))

    def _lose_instances(self, node: str, now: float, why: str) -> None:
        lost = self.registry.fail_node(node)
        for inst in lost:
            self.meter.instance_stopped(inst.instance_id, now, "died")
        if lost:
            log.error("%s: %d instances lost", why, len(lost))

    # -- reconcile loop ------------------------------------------------------------------------

    def _warm(self) -> None:
        """Ask daemons for every planned function replica that has no live instance; while a
        re-plan loads its local experts (``loading``), only for the functions it keeps (the plan
        still in force had its cold starts bought, on that request's TTFT and bill, by the plan
        replacing it: Qwen replay, 4 functions of 1 GB started while the main loaded 239 experts
        in their place)."""
        now = time.time()
        loading = self.loading
        keep = None if loading is None else {(f.id, f.experts, f.memory_gb) for f in loading.functions}
        for spec, replica in self.registry.missing_replicas():
            if keep is not None and (spec.id, spec.experts, spec.memory_gb) not in keep:
                continue
            failures, last = self.spawn_failures.get((spec.id, replica), (0, 0.0))
            if failures and now - last < min(30.0, 0.5 * 2 ** (failures - 1)):
                continue  # capped exponential backoff after failed spawns: no spawn storms
            node = self._place(spec, replica)
            unplaced = self.unplaced
            if node is None:
                if (spec.id, replica) not in unplaced:
                    unplaced.add((spec.id, replica))
                    log.warning("no live node can host %s (%.2f GB): it runs locally until one registers "
                                "([[nodes]] capacity_gb in launch.toml)", spec.id, spec.memory_gb)
                continue
            if (spec.id, replica) in unplaced:
                unplaced.discard((spec.id, replica))
                log.info("%s placed on %s again", spec.id, node)
            self._spawn(spec, replica, node)

    def _place(self, spec: FunctionSpec, replica: int) -> str | None:
        """The node for a replica: where the plan put it, else the least loaded live node it fits
        on. Instances an earlier plan left warm (Registry.superseded_on) keep their memory until
        a placement needs it; then the oldest are stopped to make room, as a serverless platform
        evicts idle containers. Their memory counts as free at once: a stopped worker exits in
        milliseconds, the new one takes far longer to load its weights."""
        wanted = spec.nodes[replica] if spec.nodes else None
        alive = {n.name: n for n in self.nodes.values() if n.alive}
        if wanted in alive:  # the planner checked the plan's own functions against its capacity
            self._make_room(alive[wanted], spec.memory_gb)
            return wanted

        def free(n: Node, reclaim: bool) -> float:
            held = self.registry.load_on(n.name)
            if reclaim:
                held -= sum(i.memory_gb for i in self.registry.superseded_on(n.name))
            return n.capacity_gb - held

        for reclaim in (False, True):
            fits = [n for n in alive.values() if free(n, reclaim) >= spec.memory_gb - 1e-9]
            if fits:
                node = max(fits, key=lambda n: free(n, reclaim) / n.capacity_gb)
                if reclaim:
                    self._make_room(node, spec.memory_gb)
                return node.name
        return None

    def _make_room(self, node: Node, need_gb: float) -> None:
        """Stop superseded instances on `node`, oldest first, until `need_gb` fits."""
        for inst in self.registry.superseded_on(node.name):
            if node.capacity_gb - self.registry.load_on(node.name) >= need_gb - 1e-9:
                return
            if self.registry.transition(inst.instance_id, State.STOPPED) is not None:
                node.ghosts[inst.instance_id] = time.time()  # still listed until it exits: not a ghost
                log.info("%s on %s evicted: the plan no longer calls it and %s needs the room", inst.instance_id,
                         node.name, f"{need_gb:g} GB")
                asyncio.get_running_loop().create_task(self._to_node(node.name, StopFunction(inst.instance_id,
                                                                                            "evicted")))

    def _spawn(self, spec: FunctionSpec, replica: int, node: str) -> None:
        f = self.config.functions
        inst = self.registry.new_instance(spec, replica, node)
        kind = self.nodes[node].kind if node in self.nodes else "cpu"
        keep = keep_alive.decide(f.keep_alive_policy, self.meter.idle_times(spec.id), fixed_s=f.keep_alive_s)
        if f.keep_alive_policy == "histogram":
            log.info("%s keep-alive %.1f s (%s)", inst.instance_id, keep.keep_alive_s, keep.reason)
        self.meter.instance_requested(inst.instance_id, spec.id, node, spec.memory_gb, list(spec.experts),
                                      replica, f.spawn, keep.keep_alive_s, device="gpu" if kind == "gpu" else "cpu")
        msg = spawn_request(inst.instance_id, spec.id, spec.experts, spec.memory_gb, self.config, self.model_path,
                            node_kind=kind, keep_alive_s=keep.keep_alive_s)  # a gpu node's functions on its GPU
        asyncio.get_running_loop().create_task(self._to_node(node, msg))

    async def stop_instance(self, instance_id: str, reason: str = "requested") -> None:
        inst = self.registry.instances.get(instance_id)
        if inst is not None:
            await self._to_node(inst.node, StopFunction(instance_id=instance_id, reason=reason))

    async def _tick(self) -> None:
        c = self.config.coordinator
        last_ping = last_metrics = 0.0
        seq = 0
        while True:
            now = time.time()
            try:
                self._judge_drops(now)
                if now - last_ping >= c.heartbeat_s:
                    last_ping = now
                    for node in list(self.nodes.values()):
                        if node.alive and now - node.last_seen > c.heartbeat_s * c.liveness:
                            self._mark_dead(node, now, f"node {node.name} silent for {now - node.last_seen:.1f} s")
                        if node.alive:
                            await self._to_node(node.name, Ping(seq=seq))
                if self.clients:
                    self._warm()  # replace instances that died mid-request
                for rid, deadline in list(self.deadlines.items()):
                    if now > deadline and rid not in self.timed_out:
                        self.timed_out.add(rid)  # the engine cancels it; _events answers Timeout
                        self.loop_thread.inbox.put(Cancel(rid))
                if now - last_metrics >= c.metrics_interval_s:
                    last_metrics = now
                    seq += 1
                    self.meter.nodes = self._nodes_view(now)
                    snapshot = MetricsSnapshot(seq=seq, time=now, payload={**self.meter.snapshot(), "seq": seq,
                                                                                  "interval_s": c.metrics_interval_s})
                    self.exporter.tick(snapshot.payload)
                    try:
                        await self.metrics.send_multipart(encode(snapshot), flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        pass  # no subscriber keeps up: drop, never block the mesh
            except Exception:
                log.exception("reconcile tick failed (the next tick retries)")
            await asyncio.sleep(min(c.heartbeat_s, c.metrics_interval_s) / 2)

    def _nodes_view(self, now: float) -> list[dict]:
        out = []
        for n in self.nodes.values():
            r = n.resources
            out.append({"name": n.name, "kind": n.kind, "host": n.host, "alive": n.alive, "pid": n.pid,
                        "last_heartbeat_s_ago": now - n.last_seen, "capacity_gb": n.capacity_gb,
                        "cpu_percent": r.get("cpu_percent"), "mem_used_gb": r.get("mem_used_gb"),
                        "mem_total_gb": r.get("mem_total_gb"), "gpus": r.get("gpus", [])})
        return out

    def status(self) -> dict:
        snap = self.meter.snapshot()
        return {"endpoints": self.endpoints, "model": str(self.model_path), "policy": snap["policy"],
                "nodes": self._nodes_view(time.time()), "instances": snap["instances"],
                "billing": snap["billing"], "slo": snap["slo"], "engine": snap["data_plane"],
                "rounds": self.executor.round_summary(), "steps": self.loop_thread.steps if self.loop_thread else 0,
                # what the planner now assumes of the data plane and the dense work (calibrated_profiles)
                "calibrated": {"scatter_gather_s": self.profiles.scatter_gather.intercept,
                               "dense_s": self.profiles.dense.intercept},
                "cold_starts": snap["cold_starts"], "deaths": snap["deaths"], "stragglers": snap["stragglers"],
                "main": snap["main"], "data_plane": snap["data_plane"], "load": snap["load"],
                "records": list(self.records.values())[-100:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the moemesh coordinator (normally started by mesh-up).")
    ap.add_argument("--config-json", required=True, help="MeshConfig as JSON (MeshConfig.to_dict())")
    ap.add_argument("--ready-file", type=Path, help="also write the endpoints JSON here when listening")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = MeshConfig.from_dict(json.loads(args.config_json))
    torch.set_num_threads(max(1, config.coordinator.threads))
    coordinator = Coordinator(config)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, coordinator.stopping.set)
        await coordinator.serve(args.ready_file)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
