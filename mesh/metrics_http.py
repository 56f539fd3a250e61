"""The coordinator's HTTP read-outs: Prometheus `/metrics` and `/v1/experts/distribution`.

    GET /metrics                         text exposition (mesh/prometheus.py names the metrics)
    GET /metrics?per_expert=1            ... plus one series per (layer, expert)
    GET /v1/experts/distribution?window_s=60&format=json|csv
                                         token-slots per layer and expert over the window
    GET /health                          {"status": "ok"}

`MetricsService` is what the coordinator holds; it is fed from the coordinator's asyncio
thread by a few hooks (Coordinator.serve / _admit / _keep_record / _tick / _shutdown):

    admitted(request_id)   after a request is handed to the engine: cost share starts, queue
                           time ends, the forecast in force is noted (predictor hits)
    finished(record)       every finished request's record: adds "gb_s" and "cost_usd" to it
                           (before the coordinator sends it in RequestDone), observes it
    tick(snapshot)         each metrics tick: gauges, running totals, the expert window

It binds on coordinator.host at coordinator.metrics_http_port (aiohttp, on the coordinator's
own event loop: the reads are a few microseconds of dict work, no thread, no extra process).
A scrape takes a fresh snapshot first, so it never lags the meter by a tick.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mesh.expert_window import ExpertWindow, to_csv
from mesh.prometheus import MeshMetrics
from mesh.request_cost import CostShares

if TYPE_CHECKING:
    from mesh.coordinator import Coordinator

log = logging.getLogger("moemesh.metrics_http")


class MetricsService:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.metrics = MeshMetrics(sorted(coordinator.config.slo.classes), coordinator.model.config.top_k)
        self.window = ExpertWindow()
        self.costs = CostShares(coordinator.meter)
        self.handed_off: dict[str, tuple[float, list | None]] = {}  # request id -> (when, forecast)
        self.runner: web.AppRunner | None = None

    # -- hooks ---------------------------------------------------------------------------------

    # Metrics never fail a request nor a tick: a hook logs its failure, counts it
    # (moemesh:exporter_errors_total) and returns.

    def admitted(self, request_id: str) -> None:
        try:
            self.costs.admitted(request_id)
            forecast = (self.coordinator.meter.policy or {}).get("forecast") or {}
            self.handed_off[request_id] = (time.time(), forecast.get("distribution"))
        except Exception:
            log.exception("metrics: admitting request %s failed", request_id)
            self.metrics.errors.inc()

    def finished(self, record: dict) -> None:
        rid = record.get("request_id", "")
        try:
            record.update(self.costs.finished(rid))
            handed, forecast = self.handed_off.pop(rid, (None, None))
            queue_s = handed - record["admitted_at"] if handed and record.get("admitted_at") else None
            self.metrics.observe_request(record, queue_s, forecast)
        except Exception:
            log.exception("metrics: observing request %s failed", rid)
            self.metrics.errors.inc()

    def tick(self, snapshot: dict, update_every_s: float = 1.0) -> None:
        """Every metrics tick: feed the expert window; update the metrics at most every
        `update_every_s` (a scrape refreshes them anyway), so a fast tick stays cheap."""
        c = self.coordinator
        try:
            now = snapshot.get("time", time.time())
            self.window.feed((snapshot.get("load") or {}).get("counts"), now)
            if now - getattr(self, "_updated_at", 0.0) < update_every_s:
                return
            self._updated_at = now
            self.metrics.update(snapshot, c.meter.instance_ledger(), c.config.coordinator.max_batch,
                                snapshot.get("data_plane") or {})
        except Exception:
            log.exception("metrics: a tick's update failed (the next one retries)")
            self.metrics.errors.inc()

    def refresh(self) -> None:
        self.tick(self.coordinator.meter.snapshot(), update_every_s=0.0)

    # -- HTTP ----------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> str:
        """Serve; returns the address it listens at ("http://host:port")."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/experts/distribution", self._distribution)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        bound_host, bound_port = self.runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{shown}:{bound_port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.refresh()
        body = generate_latest(self.metrics.registry)
        if request.query.get("per_expert", "").lower() in ("1", "true", "yes"):
            body += generate_latest(self.metrics.per_expert_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _distribution(self, request: web.Request) -> web.Response:
        try:
            window_s = float(request.query.get("window_s", "60"))
            if not window_s > 0:
                raise ValueError
        except ValueError:
            return _error(400, f"window_s must be a number of seconds > 0, got {request.query.get('window_s')!r}")
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "csv"):
            return _error(400, f"format must be json or csv, got {fmt!r}")
        self.refresh()
        reading = self.window.read(window_s, time.time())
        if fmt == "csv":
            return web.Response(text=to_csv(reading), content_type="text/csv")
        return web.json_response(reading)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": None}}, status=status)
