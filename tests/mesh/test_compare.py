"""The comparison harness's pieces: the open-loop replay (against a fake client), a row from
outcomes and a meter status, the run config, the report files, the in-process references.

`moemesh compare --quick` end to end (three real meshes) takes about 2 minutes on this
machine, too long for the suite; these tests cover every piece it is made of.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mesh import compare
from mesh import workload as wl


def small_workload(n: int = 4, gap: float = 0.05) -> wl.Workload:
    reqs = tuple(wl.WorkloadRequest(i * gap, f"Question: {i} + 1?\nAnswer:", 8, 8, 3) for i in range(n))
    return wl.Workload({"source": "test", "seed": 0, "time_scale": 1.0}, reqs)


def status(mode: str = "invocation") -> dict:
    return {
        "billing": {"mode": mode, "gb_s": 2.0, "gb_s_main": 1.5, "gb_s_experts": 0.5, "cost": 4e-5,
                    "invocations": 12, "baseline_all_local_cost": 2e-5},
        "cold_starts": [{"total_s": 1.0, "critical_path": True, "stages": {"spawn": 0.8, "weights": 0.2}},
                        {"total_s": 3.0, "critical_path": False, "stages": {"spawn": 2.5, "weights": 0.5}}],
        "stragglers": {"recent": [{"ratio": 4.0}], "imbalance": {"0": 1.5, "1": 2.5}},
        "instances": [{"function_id": "L0"}, {"function_id": "L0"}, {"function_id": "L1"}],
        "policy": {"plan": {"functions": []}},
        "main": {"memory_gb": 0.525, "held_bytes": 3 * 2**28, "experts": 4},
        "data_plane": {"calls": 12, "fallbacks": 1, "on_demand_loads": 1},
    }


def outcomes() -> list[compare.Outcome]:
    return [
        compare.Outcome(0, 10.0, 11.0, [1, 2, 3], 0.2, 0.05, True, 1),
        compare.Outcome(1, 10.5, 12.0, [4, 5, 6], 0.4, 0.07, True, 0),
        compare.Outcome(2, 11.0, 14.0, [7, 8], 2.5, 0.30, False, 0),
        compare.Outcome(3, 11.5, 12.5, [], None, None, False, 0, error="Timeout: no token"),
    ]


def test_summarise_a_row():
    ref = [[1, 2, 3], [4, 5, 0], [7, 8], [9]]
    row = compare.summarise("remoe", outcomes(), status(), [{"t_s": 0, "gb_s": 0, "cost": 0}], reference=ref)
    assert row["wall_s"] == pytest.approx(4.0) and row["generated_tokens"] == 8
    assert row["throughput_tok_s"] == pytest.approx(2.0)
    assert row["slo_attainment"] == 0.5  # the failed request counts as missed
    assert row["failed"] == 1 and row["errors"] == ["Timeout: no token"]
    assert row["ttft_s"]["p50"] == pytest.approx(0.4)
    assert row["cost"] == 4e-5 and row["gb_s"] == 2.0 and row["billing_mode"] == "invocation"
    c = row["cold_starts"]
    assert (c["total"], c["critical_path"], c["requests_waiting_on_one"]) == (2, 1, 1)
    assert c["critical_latency_s"]["p50"] == 1.0
    assert c["mean_stage_s"]["spawn"] == pytest.approx(1.65) and c["mean_stage_s"]["limits"] == 0.0
    assert row["stragglers"] == {"recent": 1, "max_imbalance": 2.5, "listed_cap": 50}
    assert row["functions"] == 2 and row["instances"] == 3
    assert row["main"]["held_bytes"] == 3 * 2**28 and row["data_plane"]["fallbacks"] == 1  # what the main held
    assert row["tokens_identical_share"] == 0.5  # requests 0 and 2
    assert "serverful_cost" not in row
    server = compare.summarise("cpu-cluster", outcomes(), status(), [], serverful_price_per_hour=3600.0)
    assert server["serverful_cost"] == pytest.approx(4.0)  # $1/s x 4 s


def test_summarise_after_a_warm_up_subtracts_it():
    s = status()
    s["cold_starts"][0]["time"] = 5.0  # before the replay (sent from 10.0 on): left out
    s["cold_starts"][1]["time"] = 10.5
    before = {"gb_s": 0.5, "gb_s_main": 0.25, "gb_s_experts": 0.25, "cost": 1e-5, "invocations": 2,
              "baseline_all_local_cost": 1e-5}
    row = compare.summarise("remoe", outcomes(), s, [], before=before)
    assert row["gb_s"] == 1.5 and row["cost"] == pytest.approx(3e-5) and row["invocations"] == 10
    assert row["baseline_all_local_cost"] == pytest.approx(1e-5)
    assert row["cold_starts"]["total"] == 1 and row["cold_starts"]["critical_path"] == 0


def test_run_config_sets_what_each_policy_needs():
    c = compare.run_config("eplb", "instance", 0.0, {}, None)
    assert (c.policy.name, c.billing.mode, c.functions.keep_alive_s) == ("eplb", "instance", 0.0)
    assert c.predictor.name == "moving-average" and c.coordinator.client_port == 0
    assert all(n.capacity_gb >= 256 for n in c.nodes)
    o = compare.run_config("oracle", "invocation", None, {"functions.cgroups": "off"}, "/tmp/traces")
    assert (o.predictor.name, o.predictor.traces, o.functions.cgroups) == ("oracle", "/tmp/traces", "off")
    assert o.functions.keep_alive_s == 30.0  # the config's own
    assert compare.run_config("all-local", "invocation", None, {"predictor.name": "bayes"}, None).predictor.name \
        == "bayes"


def test_keep_alive_choices():
    assert compare._keep_alives("config,none,fixed:30,12.5") == [None, 0.0, 30.0, 12.5]


def result_of(rows) -> dict:
    w = small_workload()
    return {"command": "moemesh compare --quick", "elapsed_s": 12.0,
            "workload": {"file": "w.jsonl", "header": w.header, "summary": w.summary()},
            "environment": compare.environment(), "rows": rows}


def test_markdown_and_plots(tmp_path):
    rows = []
    for name in ("all-local", "cpu-cluster"):
        row = compare.summarise(name, outcomes(), status(), [{"t_s": 0.0, "gb_s": 0.0, "cost": 0.0},
                                                             {"t_s": 1.0, "gb_s": 2.0, "cost": 4e-5}],
                                serverful_price_per_hour=5.5 if name == "cpu-cluster" else None)
        row["keep_alive_s"] = 30.0
        rows.append(row)
    result = result_of(rows)
    text = compare.markdown(result)
    assert text.count("\n| all-local |") == 1 and "| cpu-cluster |" in text
    assert "| 2.00 |" in text  # cost / all-local
    assert result["environment"]["git"]["revision"][:12] in text
    assert "CPUs usable" in text
    files = compare.plots(result, tmp_path)
    assert sorted(files) == ["cold_starts.png", "cost_over_time.png", "cost_vs_slo.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
    json.dumps(result)  # plain data


def test_environment_facts():
    env = compare.environment()
    assert env["machine"]["nproc"] >= 1 and env["versions"]["numpy"]
    assert set(env) >= {"git", "versions", "python", "machine", "time_utc"}


class FakeGeneration:
    def __init__(self, client, prompt, max_new_tokens):
        self.client, self.prompt, self.n = client, prompt, max_new_tokens
        self.done = None

    def __aiter__(self):
        return self._stream()

    async def text(self):
        return "".join([str(t.token_id) async for t in self])

    async def _stream(self):
        self.client.sent.append((self.prompt, asyncio.get_running_loop().time()))
        if "2 + 1" in self.prompt:
            raise RuntimeError("worker died")
        for i in range(self.n):
            yield type("Token", (), {"token_id": i})()
        self.done = type("Done", (), {"ttft_s": 0.01, "tpot_s": 0.001,
                                      "record": {"slo": {"met": True}, "cold_starts_on_path": []}})()


class FakeClient:
    def __init__(self, address, timeout_s=60.0):
        self.sent = []
        FakeClient.last = self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def generate(self, prompt, *, max_new_tokens, slo_class, stop_at_eos):
        assert stop_at_eos is False and slo_class == "interactive"
        return FakeGeneration(self, prompt, max_new_tokens)

    async def status(self, timeout_s=5.0):
        return status()


def test_replay_sends_open_loop_at_the_arrival_offsets(monkeypatch):
    import mesh.client

    monkeypatch.setattr(mesh.client, "MeshClient", FakeClient)
    w = small_workload(4, gap=0.1)
    outs, samples, final, before, _ = asyncio.run(compare.replay("tcp://x:1", w, sample_s=0.05, label="t"))
    assert before == status()["billing"]  # the bill before the first request, left out of the row
    sent = FakeClient.last.sent
    assert [p for p, _ in sent] == [r.prompt for r in w.requests]  # in arrival order
    offsets = [t - sent[0][1] for _, t in sent]
    assert all(off >= r.arrival_s - 0.02 for off, r in zip(offsets, w.requests))
    assert [len(o.tokens) for o in outs] == [3, 3, 0, 3]
    assert outs[2].error.startswith("RuntimeError") and not outs[2].slo_met
    assert outs[0].slo_met and samples and final["billing"]["mode"] == "invocation"
    outs, _, _, before, _ = asyncio.run(compare.replay("tcp://x:1", w, sample_s=0.05, warmup=2))
    sent = FakeClient.last.sent
    assert len(sent) == 6 and [p for p, _ in sent[:2]] == [w.requests[0].prompt] * 2  # warm-up first
    assert before["cost"] == 4e-5 and len(outs) == 4


def test_reference_tokens_match_the_engine_one_by_one():
    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.tokenizer import Tokenizer

    w = small_workload(3)
    batched = compare.reference_tokens(w)
    path = resolve_model_path("bundled")
    model, tok = Checkpoint(path).load_model(), Tokenizer.from_dir(path)
    for r, tokens in zip(w.requests, batched):
        single = Engine(model).complete([tok.encode(r.prompt)], SamplingParams(r.max_new_tokens, stop_at_eos=False))
        assert tokens == single[0] and len(tokens) == 3


def test_trace_workload_teaches_the_oracle(tmp_path):
    from mesh.config import resolve_model_path
    from mesh.trace import predictor_shape
    from nodes.model.checkpoint import Checkpoint
    from predictor.oracle import OraclePredictor
    from predictor.traces import TraceStore

    w = small_workload(2)
    store = compare.trace_workload(w, tmp_path / "traces")
    records = list(TraceStore.open(store))
    assert len(records) == 2
    model = Checkpoint(resolve_model_path("bundled")).load_model()
    oracle = OraclePredictor(predictor_shape(model))
    oracle.fit(records)
    forecast = oracle.forecast(records[0].features())
    assert forecast.source == "oracle" and forecast.confidence == 1.0


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    assert compare.main(["--workload", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "moemesh workload" in capsys.readouterr().err
    path = wl.save(small_workload(), tmp_path / "w.jsonl")
    assert compare.main(["--workload", str(path), "--policies", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown policies" in capsys.readouterr().err


def test_zipf_choices():
    assert compare._skews("own,0.5,1.5") == [None, 0.5, 1.5]
    assert compare._skews("") == [compare._CONFIG]
    with pytest.raises(ValueError, match=">= 0"):
        compare._skews("-1")


def test_a_zipf_sweep_runs_every_policy_per_skew_against_its_own_tokens(tmp_path, monkeypatch):
    """--zipf: one run per (skew, policy), each given the in-process tokens of its own routing
    and a config routing as it says; the table names the routing of every row."""
    path = wl.save(small_workload(), tmp_path / "w.jsonl")
    references, ran = [], []

    def reference_tokens(workload, model_path, dtype, routing_zipf):
        references.append(routing_zipf)
        return [[int(10 * (routing_zipf or 0))]] * len(workload.requests)

    def run_one(config, workload, *, label, reference, **_):
        ran.append((config.policy.name, config.model.routing_zipf, reference[0][0]))
        row = compare.summarise(config.policy.name, outcomes(), status(), [{"t_s": 0.0, "gb_s": 0.0, "cost": 0.0}])
        row["keep_alive_s"] = 30.0
        return row

    monkeypatch.setattr(compare, "reference_tokens", reference_tokens)
    monkeypatch.setattr(compare, "run_one", run_one)
    assert compare.main(["--workload", str(path), "--policies", "all-local,moeless", "--zipf", "own,1.5",
                         "--no-plots", "--out", str(tmp_path / "out")]) == 0
    assert references == [None, 1.5]
    assert ran == [("all-local", None, 0), ("moeless", None, 0), ("all-local", 1.5, 15), ("moeless", 1.5, 15)]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| moeless | zipf 1.5 |" in table and "| all-local | own |" in table
    assert compare.main(["--workload", str(path), "--zipf", "x", "--out", str(tmp_path)]) == 2
