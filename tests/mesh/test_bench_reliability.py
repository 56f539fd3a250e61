"""`moemesh bench --reliability`, tiny: 20 requests healthy, the same with one `kill -9` of a
worker, two scale-to-zero cycles, on the tiny checkpoint with one node. Checks the JSON and the
Markdown are written and well-formed and that no request was lost or duplicated; nothing here
depends on how fast the machine is (no latency or throughput target is asserted)."""

from __future__ import annotations

import json

import pytest

from mesh.bench import main as bench_main


def test_reliability_bench_tiny(tiny_model, tmp_path):
    out = tmp_path / "out"
    bench_main(["--reliability", "--set", f"model.path={tiny_model}", "--set", "policy.profiles=synthetic",
                "--nodes", "1", "--requests", "20", "--kills", "1", "--kill-every-s", "0", "--cycles", "2",
                "--keep-alive-s", "0.5", "--distinct-prompts", "8", "--only", "healthy,kill-worker,scale-to-zero",
                "--out", str(out)])
    result = json.loads((out / "reliability.json").read_text())
    assert list(result["scenarios"]) == ["healthy", "kill-worker", "scale-to-zero"]
    for name, figures in result["scenarios"].items():
        assert "error" not in figures, (name, figures["error"])
        assert figures["targets"] and all({"name", "value", "target", "met"} <= set(t) for t in figures["targets"])
        assert figures["lost"] == 0, (name, figures)
    for name in ("healthy", "kill-worker"):
        figures = result["scenarios"][name]
        assert figures["requests"] == 20 and figures["duplicated"] == 0, (name, figures)
        assert figures["mismatched"] == 0, (name, figures["failures"])  # a completed request has the right tokens
    assert result["scenarios"]["healthy"]["identical"] == 20
    kill = result["scenarios"]["kill-worker"]
    assert kill["kills"] == 1 and kill["completed"] + kill["errors"] == 20
    s2z = result["scenarios"]["scale-to-zero"]
    assert s2z["cycles"] == 2 and s2z["requests"] == 4 and s2z["failed"] == 0, s2z["failures"]
    assert s2z["reached_zero"] == 2
    md = (out / "reliability.md").read_text()
    assert md.startswith("# moemesh reliability bench") and "| kill-worker |" in md


pytestmark = pytest.mark.slow
