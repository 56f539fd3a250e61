"""Prometheus metrics from the meter: vLLM-style names under `moemesh:`, plus what only this
mesh knows (GB-s and dollars per function and node, cold starts by stage, predictor hits).

Two feeds, both on the coordinator's asyncio thread (no lock of our own):
- `observe_request(record, ...)`: one per finished request (the meter's record, the one every
  RequestDone carries): latency histograms, token and finish counters, SLO counters, predictor hits.
- `update(snapshot, ledger, max_batch)`: the meter's snapshot and `Meter.instance_ledger()`,
  each metrics tick and each scrape: gauges, and counters whose running totals the meter keeps
  (exported as they are by a custom collector, so they stay exact, never re-counted).

Everything lives in a dedicated `CollectorRegistry` (never the global one); per-expert series
(layers x experts of them) sit in a second registry, exported only on `/metrics?per_expert=1`.

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| time_to_first_token_seconds | histogram | | admission to first token |
| time_per_output_token_seconds | histogram | | a request's mean gap between tokens after the first |
| e2e_request_latency_seconds | histogram | | admission to the last token |
| request_queue_time_seconds | histogram | | admission to hand-off to the engine (prompt features, planning) |
| num_requests_running / _waiting | gauge | | in flight, within / beyond coordinator.max_batch |
| prompt_tokens_total, generation_tokens_total | counter | | tokens of finished requests |
| request_success_total | counter | finished_reason | stop (eos), length, abort (cancelled) |
| request_failure_total | counter | reason | timeout, error |
| slo_requests_total | counter | slo_class, met | finished requests against their class's targets |
| slo_attainment | gauge | slo_class | share met over the meter's window (cancelled apart) |
| gb_seconds_total, cost_usd_total | counter | function, node | billed so far ("main" / "coordinator": the main function) |
| baseline_all_local_gb_seconds_total, baseline_all_local_cost_usd_total | counter | | the all-local deployment, same traffic |
| request_gb_seconds_total, request_cost_usd_total | counter | slo_class | finished requests' shares (mesh/request_cost.py) |
| cold_starts_total | counter | path | instances that became ready (zygote, fresh) |
| cold_start_duration_seconds | histogram | stage | each stage the worker timed, and "total" |
| stragglers_total | counter | | replies later than straggler_k x their round's median |
| fallbacks_total, retries_total, late_calls_total, remote_calls_total | counter | | the data plane |
| function_instances | gauge | state | instances alive by state (starting, warm) |
| expert_load_tokens_total | counter | layer | token-slots routed in a MoE layer |
| expert_load_max_over_mean | gauge | layer | busiest expert's share over the mean, since start |
| expert_load_imbalance | gauge | layer | the same for the layer's last pass |
| predictor_hits_total, predictor_queries_total | counter | | top-k overlap of forecast and actual load |
| expert_tokens_total | counter | layer, expert | only with ?per_expert=1 |
| exporter_errors_total | counter | | this module's own failures (logged; serving goes on) |

Predictor hits: the meter does not count them, so this module does, from what the coordinator
holds. For every finished request that ran under a forecast (adaptive policies: the forecast in
force when it was admitted), per MoE layer: queries += top_k, hits += |top-k experts of the
forecast's distribution  ∩  top-k experts of the request's actual token-slot counts| (prefill +
decode). `rate(hits) / rate(queries)` is the top-k recall of the forecast. Baseline policies
make no forecast: both stay 0.

Stragglers: the meter keeps the 200 newest; they are counted once each from the snapshot's 50
newest, so more than 50 within one metrics interval would be under-counted.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "moemesh:"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)
TOKEN_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                     5.0, 10.0)
COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FINISHED = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}  # ours -> vLLM's words
LIVE_STATES = ("starting", "warm")


def top_k_hits(forecast: np.ndarray, actual: np.ndarray, k: int) -> tuple[int, int]:
    """(hits, queries): per layer, |top-k of forecast[l] ∩ top-k of actual[l]|, and k per layer
    that routed any token. forecast, actual: [layers, experts]."""
    hits = queries = 0
    k = max(1, min(k, actual.shape[1]))
    for f_row, a_row in zip(forecast, actual):
        if a_row.sum() <= 0:
            continue
        predicted = set(np.argsort(-f_row, kind="stable")[:k].tolist())
        used = set(np.argsort(-a_row, kind="stable")[:k].tolist())
        hits += len(predicted & used)
        queries += k
    return hits, queries


class MeshMetrics:
    def __init__(self, slo_classes: list[str], top_k: int) -> None:
        disable_created_metrics()  # no `_created` series (process-wide in prometheus_client; as vLLM)
        self.top_k = top_k
        self.registry = CollectorRegistry(auto_describe=True)
        self.per_expert_registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name: str, doc: str, buckets, labels=()) -> Histogram:
            return Histogram(PREFIX + name, doc, labelnames=labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(PREFIX + name, doc, labelnames=labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Admission to first token, per request.", LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds",
                         "Mean gap between output tokens after the first, per request.", TOKEN_GAP_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Admission to the last token, per request.", LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds",
                          "Admission to hand-off to the engine (prompt features, planning), per request.",
                          LATENCY_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated by finished requests.")
        self.success = counter("request_success", "Finished requests by finish reason (stop, length, abort).",
                               ("finished_reason",))
        self.failure = counter("request_failure", "Failed requests by reason (timeout, error).", ("reason",))
        self.slo_requests = counter("slo_requests", "Finished requests against their SLO class's targets.",
                                    ("slo_class", "met"))
        self.request_gb_s = counter("request_gb_seconds",
                                    "GB-s shares of finished requests (billed while in flight / requests in flight).",
                                    ("slo_class",))
        self.request_cost = counter("request_cost_usd", "Dollar shares of finished requests.", ("slo_class",))
        self.cold_starts = counter("cold_starts", "Function instances that became ready, by spawn path.", ("path",))
        self.cold_start_s = hist("cold_start_duration_seconds",
                                 "Cold-start stages as the worker timed them, and their total.",
                                 COLD_START_BUCKETS, ("stage",))
        self.stragglers = counter("stragglers", "Replies later than straggler_k x their round's median.")
        self.predictor_hits = counter("predictor_hits",
                                      "Top-k experts per layer that the forecast and the request's load share.")
        self.predictor_queries = counter("predictor_queries", "Top-k experts per layer forecast (top_k per layer).")
        self.errors = counter("exporter_errors", "Failures of this exporter's own hooks (see the coordinator log).")
        for name in slo_classes:
            for met in ("true", "false"):
                self.slo_requests.labels(name, met)
        self.latest: dict = {}
        self.data_plane: dict = {}
        self.max_batch = 1
        self.ledger: dict[str, dict] = {}  # instance id -> its last row
        self.retired: dict[tuple[str, str], list[float]] = {}  # (function, node) -> [gb_s, cost] folded
        self.seen_ready: set[str] = set()
        self.seen_stragglers: deque = deque(maxlen=1000)
        r.register(_SnapshotCollector(self))
        self.per_expert_registry.register(_PerExpertCollector(self))

    # -- per request --------------------------------------------------------------------------

    def observe_request(self, record: dict, queue_s: float | None = None,
                        forecast: list | None = None) -> None:
        """record: the meter's request record (mesh/meter.py `_record`), with "gb_s" / "cost_usd"
        from mesh/request_cost.py and "activation" {prefill, decode} when the engine gave one."""
        reason = record.get("finish_reason", "")
        if reason in ("timeout", "error"):
            self.failure.labels(reason).inc()
        else:
            self.success.labels(FINISHED.get(reason, reason or "unknown")).inc()
        self.prompt_tokens.inc(record.get("prompt_tokens") or 0)
        self.generation_tokens.inc(record.get("generated_tokens") or 0)
        if record.get("ttft_s") is not None:
            self.ttft.observe(record["ttft_s"])
        if record.get("tpot_s") is not None and (record.get("generated_tokens") or 0) > 1:
            self.tpot.observe(record["tpot_s"])
        if record.get("done_at") is not None and record.get("admitted_at") is not None:
            self.e2e.observe(max(0.0, record["done_at"] - record["admitted_at"]))
        if queue_s is not None:
            self.queue.observe(max(0.0, queue_s))
        slo_class = record.get("slo_class", "")
        if reason != "cancelled":
            met = bool((record.get("slo") or {}).get("met"))
            self.slo_requests.labels(slo_class, "true" if met else "false").inc()
        self.request_gb_s.labels(slo_class).inc(record.get("gb_s") or 0.0)
        self.request_cost.labels(slo_class).inc(record.get("cost_usd") or 0.0)
        activation = record.get("activation")
        if forecast is not None and activation:
            actual = np.asarray(activation["prefill"], dtype=np.float64) + np.asarray(activation["decode"])
            predicted = np.asarray(forecast, dtype=np.float64)
            if predicted.shape == actual.shape:
                hits, queries = top_k_hits(predicted, actual, self.top_k)
                self.predictor_hits.inc(hits)
                self.predictor_queries.inc(queries)

    # -- per tick / scrape ----------------------------------------------------------------------

    def update(self, snapshot: dict, ledger: list[dict], max_batch: int, data_plane: dict | None = None) -> None:
        """snapshot: Meter.snapshot(); ledger: Meter.instance_ledger(); data_plane: running
        totals {calls, fallbacks, retries, late} (default: the snapshot's "data_plane")."""
        self.latest, self.max_batch = snapshot, max(1, max_batch)
        self.data_plane = dict(data_plane if data_plane is not None else snapshot.get("data_plane") or {})
        rows = {row["instance_id"]: row for row in ledger}
        for iid, row in self.ledger.items():
            if iid not in rows:  # folded into the meter's per-function totals: keep its last row
                total = self.retired.setdefault((row["function_id"], row["node"]), [0.0, 0.0])
                total[0] += row["gb_s"]
                total[1] += row["cost"]
        self.ledger = rows
        for iid, row in rows.items():
            if row["ready_at"] is not None and iid not in self.seen_ready:
                self.seen_ready.add(iid)
                self.cold_starts.labels(row["path"] or "unknown").inc()
                for stage, seconds in row["stages"].items():
                    self.cold_start_s.labels(stage).observe(seconds)
                self.cold_start_s.labels("total").observe(sum(row["stages"].values()))
        self.seen_ready &= set(rows)
        for item in (snapshot.get("stragglers") or {}).get("recent", []):
            key = (item.get("time"), item.get("instance_id"), item.get("layer"))
            if key not in self.seen_stragglers:
                self.seen_stragglers.append(key)
                self.stragglers.inc()

    def billed(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(function, node) -> (gb_s, cost) so far: live rows plus retired ones."""
        out = {key: (v[0], v[1]) for key, v in self.retired.items()}
        for row in self.ledger.values():
            key = (row["function_id"], row["node"])
            gb_s, cost = out.get(key, (0.0, 0.0))
            out[key] = (gb_s + row["gb_s"], cost + row["cost"])
        return out


class _SnapshotCollector:
    """Gauges and running totals read from the latest snapshot at scrape time."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m, snap = self.m, self.m.latest
        active = int((snap.get("slo") or {}).get("requests_active") or 0)
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in the engine's batch.",
                                value=min(active, m.max_batch))
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests in flight beyond coordinator.max_batch.",
                                value=max(0, active - m.max_batch))
        gb_s = CounterMetricFamily(PREFIX + "gb_seconds", "GB-s billed, per function and node.",
                                   labels=["function", "node"])
        cost = CounterMetricFamily(PREFIX + "cost_usd", "Dollars billed, per function and node.",
                                   labels=["function", "node"])
        for (function, node), (g, c) in sorted(m.billed().items()):
            gb_s.add_metric([function, node], g)
            cost.add_metric([function, node], c)
        yield gb_s
        yield cost
        billing = snap.get("billing") or {}
        yield CounterMetricFamily(PREFIX + "baseline_all_local_gb_seconds",
                                  "GB-s the all-local deployment would be billed for the same traffic.",
                                  value=billing.get("baseline_all_local_gb_s") or 0.0)
        yield CounterMetricFamily(PREFIX + "baseline_all_local_cost_usd",
                                  "Dollars the all-local deployment would be billed for the same traffic.",
                                  value=billing.get("baseline_all_local_cost") or 0.0)
        plane = m.data_plane
        for key, name, doc in (("fallbacks", "fallbacks", "Chunks computed in the main function after failed calls."),
                               ("retries", "retries", "Expert calls retried on another replica."),
                               ("late", "late_calls", "Expert calls given up on after policy.call_timeout_s."),
                               ("calls", "remote_calls", "Expert calls sent (retries included).")):
            yield CounterMetricFamily(PREFIX + name, doc, value=plane.get(key, 0))
        instances = GaugeMetricFamily(PREFIX + "function_instances", "Function instances alive, by state.",
                                      labels=["state"])
        states = {state: 0 for state in LIVE_STATES}
        for inst in snap.get("instances") or []:
            if inst.get("stopped_at") is None:
                states[inst.get("state", "unknown")] = states.get(inst.get("state", "unknown"), 0) + 1
        for state, count in sorted(states.items()):
            instances.add_metric([state], count)
        yield instances
        attainment = GaugeMetricFamily(PREFIX + "slo_attainment",
                                       "Share of requests that met their SLO over the meter's window.",
                                       labels=["slo_class"])
        for name, c in sorted(((snap.get("slo") or {}).get("classes") or {}).items()):
            if c.get("attainment") is not None:
                attainment.add_metric([name], c["attainment"])
        yield attainment
        load = snap.get("load")
        tokens = CounterMetricFamily(PREFIX + "expert_load_tokens", "Token-slots routed in a MoE layer.",
                                     labels=["layer"])
        spread = GaugeMetricFamily(PREFIX + "expert_load_max_over_mean",
                                   "Busiest expert's token-slots over the layer's mean, since start.", labels=["layer"])
        if load:
            counts = np.asarray(load["counts"], dtype=np.float64)  # [layers, experts]
            for layer, row in enumerate(counts):
                tokens.add_metric([str(layer)], float(row.sum()))
                if row.mean() > 0:
                    spread.add_metric([str(layer)], float(row.max() / row.mean()))
        yield tokens
        yield spread
        last = GaugeMetricFamily(PREFIX + "expert_load_imbalance",
                                 "Busiest expert over the mean in the layer's last pass.", labels=["layer"])
        for layer, value in ((snap.get("stragglers") or {}).get("imbalance") or {}).items():
            last.add_metric([str(layer)], value)
        yield last


class _PerExpertCollector:
    def __init__(self, metrics: MeshMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        family = CounterMetricFamily(PREFIX + "expert_tokens", "Token-slots routed to one expert.",
                                     labels=["layer", "expert"])
        load = self.m.latest.get("load")
        if load:
            for layer, row in enumerate(load["counts"]):
                for expert, count in enumerate(row):
                    family.add_metric([str(layer), str(expert)], count)
        yield family
