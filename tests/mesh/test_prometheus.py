"""Prometheus metrics and the expert distribution: small parts on fakes, then a scrape of a real
mesh's /metrics, parsed with prometheus_client's parser, checked against the meter's own
figures (status, RequestDone records) after a known workload."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.client import MeshClient
from mesh.expert_window import ExpertWindow, to_csv
from mesh.prometheus import MeshMetrics, top_k_hits
from mesh.request_cost import CostShares
from tests.mesh.conftest import running_mesh

# -- small parts --------------------------------------------------------------------------------


def test_expert_window_sums_the_buckets_inside_the_window():
    w = ExpertWindow(bucket_s=1.0, max_window_s=10.0)
    w.feed([[0, 0], [0, 0]], now=100.2)
    w.feed([[1, 2], [0, 3]], now=100.7)  # +[[1,2],[0,3]] in second 100
    w.feed([[1, 2], [0, 3]], now=101.5)  # nothing new
    w.feed([[4, 2], [1, 3]], now=103.1)  # +[[3,0],[1,0]] in second 103
    assert w.read(1.0, now=103.5)["counts"] == [[3, 0], [1, 0]]
    assert w.read(5.0, now=103.5)["counts"] == [[4, 2], [1, 3]]
    assert w.read(5.0, now=103.5)["total"] == 10
    w.feed([[4, 2], [1, 3]], now=120.0)  # beyond max_window_s: old buckets dropped
    late = w.read(60.0, now=120.0)
    assert (late["window_s"], late["total"]) == (10.0, 0)
    rows = list(csv.DictReader(io.StringIO(to_csv({"counts": [[4, 2], [1, 3]]}))))
    assert rows[1] == {"layer": "0", "expert": "1", "tokens": "2"} and len(rows) == 4
    assert ExpertWindow().read(60, now=1.0)["counts"] == []


def test_top_k_hits_is_the_overlap_of_the_forecast_and_actual_top_k():
    forecast = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]])
    actual = np.array([[9, 0, 5, 0], [0, 0, 0, 0]])  # layer 1 routed nothing: not a query
    assert top_k_hits(forecast, actual, 2) == (1, 2)  # {0, 1} vs {0, 2}
    assert top_k_hits(forecast, np.array([[1, 1, 0, 0], [0, 0, 3, 4]]), 2) == (4, 4)


class FakeMeter:
    def __init__(self) -> None:
        self.gb_s = self.cost = 0.0

    def billing(self) -> dict:
        return {"gb_s": self.gb_s, "cost": self.cost}


def test_cost_shares_split_spend_among_the_requests_in_flight():
    meter = FakeMeter()
    costs = CostShares(meter)
    costs.admitted("a")
    meter.gb_s, meter.cost = 2.0, 0.2  # a alone: all of it
    costs.admitted("b")
    meter.gb_s, meter.cost = 6.0, 0.6  # a and b: half each
    assert costs.finished("a") == pytest.approx({"gb_s": 4.0, "cost_usd": 0.4})
    meter.gb_s, meter.cost = 7.0, 0.7  # b alone
    assert costs.finished("b") == pytest.approx({"gb_s": 3.0, "cost_usd": 0.3})
    meter.gb_s = 9.0  # idle: nobody's
    costs.admitted("c")
    assert costs.finished("c") == {"gb_s": 0.0, "cost_usd": 0.0}
    assert costs.finished("never") == {"gb_s": 0.0, "cost_usd": 0.0}


def test_billing_of_an_instance_the_meter_folds_away_is_kept():
    m = MeshMetrics(["interactive"], top_k=2)
    row = {"instance_id": "i1", "function_id": "f", "node": "n", "path": "zygote", "state": "warm",
           "ready_at": 1.0, "stages": {"spawn": 0.1, "weights": 0.2}, "gb_s": 3.0, "cost": 0.03}
    m.update({}, [row, {**row, "instance_id": "i2", "gb_s": 1.0, "cost": 0.01}], max_batch=4)
    m.update({}, [{**row, "instance_id": "i2", "gb_s": 1.5, "cost": 0.015}], max_batch=4)  # i1 retired
    assert m.billed()[("f", "n")] == pytest.approx((4.5, 0.045))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert families["moemesh:cold_starts"].samples[0].value == 2  # each instance once
    assert families["moemesh:gb_seconds"].samples[0].labels == {"function": "f", "node": "n"}


# -- a real mesh --------------------------------------------------------------------------------

PROMPTS = ["def fibonacci(n):", "Question: 2 + 3 = ?", "The licence grants"]


def _scrape(url: str) -> dict[str, list]:
    """family name -> [(sample name, labels, value)]"""
    with urllib.request.urlopen(url) as r:
        text = r.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    rows = [v for name, lab, v in families[family] if (sample is None or name == sample)
            and all(lab.get(k) == val for k, val in labels.items())]
    assert rows, f"no {sample or family} {labels} in {families.get(family)}"
    return sum(rows)


def test_a_scrape_agrees_with_the_meter_after_a_known_workload(tmp_path):
    overrides = {"policy.name": "static-split", "policy.remote": [[0, 0], [1, 1], [2, 3]],
                 "billing.mode": "invocation"}  # invocation mode: nothing accrues while idle
    with running_mesh("bundled", tmp_path, **overrides) as mesh:
        address = mesh.endpoints["client"]
        metrics_url = mesh.endpoints["http_metrics"]
        assert metrics_url.startswith("http://127.0.0.1:")

        async def workload():
            async with MeshClient(address, timeout_s=60) as client:
                dones = []
                for i, prompt in enumerate(PROMPTS):
                    gen = client.generate(prompt, max_new_tokens=6 + i, stop_at_eos=False)
                    await gen.text()
                    dones.append(gen.done)
                return dones, await client.status()

        dones, status = asyncio.run(workload())
        families = _scrape(metrics_url + "/metrics")
        records = [d.record for d in dones]

        assert _value(families, "moemesh:prompt_tokens") == sum(d.prompt_tokens for d in dones)
        assert _value(families, "moemesh:generation_tokens") == sum(d.generated_tokens for d in dones) == 21
        assert _value(families, "moemesh:request_success", finished_reason="length") == 3
        for family, key in (("moemesh:time_to_first_token_seconds", "ttft_s"),
                            ("moemesh:time_per_output_token_seconds", "tpot_s")):
            assert _value(families, family, family + "_count") == 3
            assert _value(families, family, family + "_sum") == pytest.approx(sum(r[key] for r in records))
        assert _value(families, "moemesh:e2e_request_latency_seconds", "moemesh:e2e_request_latency_seconds_count") == 3
        assert _value(families, "moemesh:request_queue_time_seconds", "moemesh:request_queue_time_seconds_count") == 3
        met = sum(bool(r["slo"]["met"]) for r in records)
        assert _value(families, "moemesh:slo_requests", slo_class="interactive", met="true") == met
        assert _value(families, "moemesh:slo_attainment", slo_class="interactive") == pytest.approx(
            status["slo"]["classes"]["interactive"]["attainment"])
        assert _value(families, "moemesh:num_requests_running") == 0

        # billing: per (function, node) against the meter's by_function and total, to the cent's billionth
        billing = status["billing"]
        for function, entry in billing["by_function"].items():
            assert _value(families, "moemesh:gb_seconds", function=function) == pytest.approx(entry["gb_s"])
        assert _value(families, "moemesh:gb_seconds", function="main") == pytest.approx(billing["gb_s_main"])
        assert _value(families, "moemesh:gb_seconds") == pytest.approx(billing["gb_s"])
        assert _value(families, "moemesh:cost_usd") == pytest.approx(billing["cost"])
        nodes = {lab["node"] for _, lab, _ in families["moemesh:gb_seconds"]}
        assert nodes == {"coordinator", "cpu0"}
        per_request = sum(r["gb_s"] for r in records)
        assert 0 < per_request <= billing["gb_s"] + 1e-9
        assert _value(families, "moemesh:request_gb_seconds") == pytest.approx(per_request)

        # functions and cold starts
        ready = [i for i in status["instances"] if i["started_at"] is not None]
        assert _value(families, "moemesh:cold_starts") == len(ready) == 3
        assert _value(families, "moemesh:cold_start_duration_seconds", "moemesh:cold_start_duration_seconds_count",
                      stage="total") == 3
        assert _value(families, "moemesh:cold_start_duration_seconds", "moemesh:cold_start_duration_seconds_sum",
                      stage="weights") == pytest.approx(sum(i["stages"]["weights"] for i in ready))
        assert _value(families, "moemesh:function_instances", state="warm") == sum(
            i["state"] == "warm" for i in status["instances"])
        assert _value(families, "moemesh:remote_calls") == status["engine"]["calls"] > 0
        assert _value(families, "moemesh:fallbacks") == status["engine"]["fallbacks"]
        assert _value(families, "moemesh:predictor_queries") == 0  # static-split makes no forecast
        assert _value(families, "moemesh:stragglers") >= 0

        # expert load: per layer in /metrics, per expert in the distribution, both = the requests' own
        actual = sum(np.asarray(r["activation"]["prefill"]) + np.asarray(r["activation"]["decode"]) for r in records)
        for layer, row in enumerate(actual):
            assert _value(families, "moemesh:expert_load_tokens", layer=str(layer)) == row.sum()
        with urllib.request.urlopen(metrics_url + "/v1/experts/distribution?window_s=600") as r:
            reading = json.load(r)
        assert np.array_equal(np.asarray(reading["counts"]), actual)
        assert (reading["layers"], reading["experts"]) == actual.shape
        with urllib.request.urlopen(metrics_url + "/v1/experts/distribution?window_s=600&format=csv") as r:
            rows = list(csv.DictReader(io.StringIO(r.read().decode())))
        assert sum(int(row["tokens"]) for row in rows) == actual.sum() and len(rows) == actual.size
        per_expert = _scrape(metrics_url + "/metrics?per_expert=1")["moemesh:expert_tokens"]
        assert len(per_expert) == actual.size and sum(v for _, _, v in per_expert) == actual.sum()
        assert "moemesh:expert_tokens" not in families  # bounded cardinality unless asked
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(metrics_url + "/v1/experts/distribution?window_s=-1")
        assert err.value.code == 400
        assert status["endpoints"]["http_metrics"] == metrics_url
        assert _value(families, "moemesh:exporter_errors") == 0
