"""Workload files: arrival processes checked statistically (fixed seeds), the Azure window and
time scale honoured, prompts fitted to lengths, exact round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mesh import workload as wl
from mesh.workload import PromptPool, WorkloadError


def words_pool() -> PromptPool:
    """A pool whose tokenizer is whitespace words: prompts of 1..40 words (lengths known)."""
    texts = [" ".join(f"w{i}" for i in range(n)) for n in (1, 3, 5, 8, 13, 21, 34, 40)]
    texts += ["x0 x1 x2 x3 x4"]  # a second prompt of length 5: ties go to the seed
    return PromptPool.build(texts, str.split, " ".join, name="words")


def gaps(w: wl.Workload) -> np.ndarray:
    return np.diff([r.arrival_s for r in w.requests])


def test_poisson_rate_and_cv():
    w = wl.synthetic("poisson", words_pool(), rate_per_s=5.0, count=4000, seed=0)
    g = gaps(w)
    assert w.requests[0].arrival_s == 0.0
    assert g.mean() == pytest.approx(0.2, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.06)  # exponential: CV 1


def test_gamma_is_bursty_with_the_asked_rate():
    w = wl.synthetic("gamma", words_pool(), rate_per_s=5.0, shape=0.25, count=4000, seed=0)
    g = gaps(w)
    assert g.mean() == pytest.approx(0.2, rel=0.08)
    assert g.std() / g.mean() == pytest.approx(2.0, rel=0.1)  # CV = 1/sqrt(k) = 2
    assert w.summary()["interarrival_cv"] > 1.5
    assert w.header["shape"] == 0.25


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    pool = words_pool()
    a = wl.save(wl.synthetic("gamma", pool, rate_per_s=2, count=50, seed=3), tmp_path / "a.jsonl")
    b = wl.save(wl.synthetic("gamma", pool, rate_per_s=2, count=50, seed=3), tmp_path / "b.jsonl")
    c = wl.save(wl.synthetic("gamma", pool, rate_per_s=2, count=50, seed=4), tmp_path / "c.jsonl")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_file_round_trip_jsonl_and_json(tmp_path):
    w = wl.synthetic("poisson", words_pool(), rate_per_s=1, count=12, seed=1, slo_classes="interactive:1,batch:1",
                     max_new_tokens=7)
    path = wl.save(w, tmp_path / "w.jsonl")
    back = wl.load(path)
    assert back.requests == w.requests
    assert back.header == w.header
    assert {r.slo_class for r in back.requests} == {"interactive", "batch"}
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "moemesh-workload" and len(lines) == 13
    whole = tmp_path / "w.json"
    whole.write_text(json.dumps({"header": json.loads(lines[0]), "requests": [json.loads(x) for x in lines[1:]]},
                                indent=2))
    assert wl.load(whole).requests == w.requests


def test_bad_files_say_what_to_do(tmp_path):
    with pytest.raises(WorkloadError, match="moemesh workload"):
        wl.load(tmp_path / "absent.jsonl")
    (tmp_path / "x.jsonl").write_text('{"kind": "other"}\n')
    with pytest.raises(WorkloadError, match="kind"):
        wl.load(tmp_path / "x.jsonl")


def test_prompt_fit_nearest_and_concatenated():
    pool, rng = words_pool(), np.random.default_rng(0)
    text, n, how = pool.fit(20, rng)
    assert (n, how) == (21, "nearest") and len(text.split()) == 21
    assert {pool.fit(5, np.random.default_rng(s))[0] for s in range(20)} == {
        "w0 w1 w2 w3 w4", "x0 x1 x2 x3 x4"}  # ties: both chosen, by seed
    text, n, how = pool.fit(100, rng)
    assert (n, how) == (100, "concatenated")


def write_trace(path, offsets, context, generated):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t, c, g in zip(offsets, context, generated):
        whole = int(t)
        frac = round((t - whole) * 1e7)
        rows.append(f"2023-11-16 18:{whole // 60:02d}:{whole % 60:02d}.{frac:07d},{c},{g}")
    path.write_text("\n".join(rows) + "\n")


def test_azure_window_time_scale_and_lengths(tmp_path):
    offsets = [0.0, 5.5, 10.0, 12.25, 19.0, 30.0, 41.5]
    context = [80, 160, 8, 400, 40, 160, 80]
    generated = [16, 400, 1, 8, 80, 16, 16]
    trace = tmp_path / "t.csv"
    write_trace(trace, offsets, context, generated)
    w = wl.from_azure_trace(words_pool(), trace=trace, start_s=5.0, duration_s=20.0, time_scale=4.0,
                            prompt_scale=0.25, prompt_cap=30, output_scale=0.5, output_cap=50, seed=0)
    assert [r.source["context_tokens"] for r in w.requests] == [160, 8, 400, 40]  # [5, 25) s
    assert [r.arrival_s for r in w.requests] == pytest.approx([0.0, 4.5 / 4, 6.75 / 4, 13.5 / 4])
    assert [r.prompt_tokens_target for r in w.requests] == [30, 2, 30, 10]  # 0.25 x, cap 30
    assert [r.max_new_tokens for r in w.requests] == [50, 1, 4, 40]  # 0.5 x, floor 1, cap 50
    assert w.header["window"] == {"start_s": 5.0, "duration_s": 20.0} and w.header["time_scale"] == 4.0
    assert w.header["prompt_tokens"] == {"scale": 0.25, "cap": 30}
    with pytest.raises(WorkloadError, match="no requests"):
        wl.from_azure_trace(words_pool(), trace=trace, start_s=100.0, duration_s=5.0)


def test_azure_real_trace_window(tmp_path):
    """The shipped trace: a 10-minute window replays in 60 s; thinning keeps about its share."""
    trace = wl.default_trace_path()
    if not trace.exists():
        pytest.skip(f"{trace} absent")
    rows = [r for r in wl.read_azure_trace(trace) if 600 <= r.offset_s < 1200]
    pool = words_pool()
    full = wl.from_azure_trace(pool, trace=trace, start_s=600, duration_s=600, time_scale=10, seed=0)
    assert len(full.requests) == len(rows)
    assert full.duration_s <= 60.0
    assert full.duration_s == pytest.approx((rows[-1].offset_s - rows[0].offset_s) / 10, abs=1e-5)
    thin = wl.from_azure_trace(pool, trace=trace, start_s=600, duration_s=600, time_scale=10, seed=0,
                               keep_fraction=0.1)
    assert len(thin.requests) == pytest.approx(0.1 * len(rows), rel=0.15)
    again = wl.from_azure_trace(pool, trace=trace, start_s=600, duration_s=600, time_scale=10, seed=0,
                                keep_fraction=0.1)
    assert again.requests == thin.requests


def test_bundled_pool_and_cli(tmp_path):
    pool = PromptPool.bundled()
    assert len(pool.texts) > 1000 and pool.lengths == sorted(pool.lengths)
    out = tmp_path / "w.jsonl"
    assert wl.main(["poisson", "--out", str(out), "--rate", "2", "--requests", "5", "--seed", "7"]) == 0
    w = wl.load(out)
    assert len(w.requests) == 5 and all(r.prompt_tokens == len(pool.encode(r.prompt)) for r in w.requests)
