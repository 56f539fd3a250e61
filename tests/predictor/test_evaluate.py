"""End to end on synthetic traces: learned predictors beat the baselines; report and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from predictor.evaluate import default_predictors, evaluate, main, similarity_check, sps_scaling
from predictor.traces import TraceStore

LEARNED = ("sps", "bayes", "layer-aware")
BASELINES = ("moving-average", "recent-use")


@pytest.fixture(scope="module")
def report(synthetic_model, synthetic_split):
    train, test = synthetic_split
    predictors = default_predictors(synthetic_model.shape, seed=0, test_records=test)
    return evaluate(predictors, train, test, synthetic_model.shape)


def summary(report, name):
    return next(row for row in report.rows() if row["predictor"] == name)


@pytest.mark.parametrize("learned", LEARNED)
def test_learned_predictors_beat_both_baselines(report, learned):
    row = summary(report, learned)
    for baseline in BASELINES:
        base = summary(report, baseline)
        assert row["js"] < 0.5 * base["js"], (learned, baseline)
        assert row["recall@2"] > base["recall@2"] + 0.1, (learned, baseline)
        assert row["coverage@4"] > base["coverage@4"], (learned, baseline)
        assert row["load_error"] < base["load_error"], (learned, baseline)


@pytest.mark.parametrize("learned", LEARNED)
def test_higher_confidence_means_lower_error(report, learned):
    row = summary(report, learned)
    assert row["confidence_vs_js_spearman"] < -0.2
    bins = next(result.calibration for result in report.results if result.name == learned)
    assert bins[-1]["mean_error"] < bins[0]["mean_error"]


def test_oracle_is_the_upper_bound(report):
    oracle = summary(report, "oracle")
    assert oracle["js"] == pytest.approx(0.0, abs=1e-12)
    assert oracle["recall@2"] == 1.0 and oracle["load_error"] == 0.0
    assert oracle["straggler_precision"] == oracle["straggler_recall"] == 1.0
    assert all(oracle["js"] <= row["js"] for row in report.rows())


def test_sps_tree_is_close_to_brute_force(report):
    assert summary(report, "sps")["js"] < 1.25 * summary(report, "sps-brute")["js"]


def test_report_renders_and_serialises(report):
    markdown = report.to_markdown()
    for row in report.rows():
        assert f"| {row['predictor']} |" in markdown
    body = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert len(body["results"]) == len(report.results)
    assert len(body["results"][0]["per_layer"]["js"]) == report.shape.layers


def test_similar_prompts_route_alike(synthetic_split):
    train, _ = synthetic_split
    check = similarity_check(train, pairs=500, seed=0)
    assert check["spearman"] < -0.3


def test_online_evaluation_keeps_learning(synthetic_model, synthetic_split):
    train, test = synthetic_split
    [predictor] = default_predictors(synthetic_model.shape, names=["moving-average"])
    evaluate([predictor], train[:50], test[:20], synthetic_model.shape, online=True)
    assert predictor.observations == 70


def test_sps_scaling_rows():
    rows = sps_scaling((200, 800), dim=8, seed=0, queries=10, clusters=8)
    assert [row["n"] for row in rows] == [200, 800]
    assert rows[1]["sps_evaluations_per_search"] < rows[1]["brute_evaluations_per_search"]
    assert 0.0 <= rows[1]["recall_vs_brute"] <= 1.0


def test_main_writes_report_and_plots(tmp_path, synthetic_model, synthetic_split):
    train, test = synthetic_split
    store = TraceStore.create(tmp_path / "traces", synthetic_model.meta())
    store.extend(train[:120] + test[:30])
    out = tmp_path / "out"
    code = main(["--traces", str(tmp_path / "traces"), "--out", str(out), "--seed", "1", "--quiet",
                 "--predictors", "moving-average,sps,oracle"])
    assert code == 0
    for name in ("report.json", "report.md", "similarity_vs_divergence.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    body = json.loads((out / "report.json").read_text())
    assert [row["predictor"] for row in body["summary"]] == ["moving-average", "sps", "oracle"]
    assert body["train_size"] + body["test_size"] == 150
    assert np.isfinite(body["similarity_check"]["spearman"])


def test_every_predictor_is_deterministic_under_its_seed(synthetic_model, synthetic_split):
    train, test = synthetic_split
    runs = []
    for _ in range(2):
        predictors = default_predictors(synthetic_model.shape, seed=5, test_records=test)
        for predictor in predictors:
            predictor.fit(train[:80])
        runs.append([[p.forecast(r.features()) for r in test[:5]] for p in predictors])
    for first, second in zip(*runs):
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a.distribution, b.distribution)
            assert a.confidence == b.confidence and a.stragglers == b.stragglers
