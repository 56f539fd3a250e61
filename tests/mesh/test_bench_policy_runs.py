"""`moemesh bench --policies --repeats N`: how a policy's runs become its row (mesh.bench.summarise_runs)."""

from __future__ import annotations

import pytest

from mesh.bench import RUN_FIGURES, summarise_runs


def run(gb_s: float, cost: float, same: bool = True) -> dict:
    return {**{k: 0.0 for k in RUN_FIGURES}, "gb_s": gb_s, "cost": cost, "tokens_identical": same, "marker": gb_s}


def test_each_row_is_the_median_run_with_every_run_and_the_cost_spread_against_all_local():
    rows = summarise_runs({
        "all-local": [run(0.15, 3.0), run(0.10, 2.0), run(0.12, 2.5)],
        "moemesh": [run(0.11, 2.2), run(0.13, 2.6, same=False)],
    })
    assert rows["all-local"]["marker"] == 0.12 and rows["all-local"]["cost_vs_all_local"] == 1.0
    assert rows["all-local"]["cost_vs_all_local_range"] == pytest.approx([0.8, 1.2])
    moemesh = rows["moemesh"]
    assert moemesh["marker"] == 0.11  # the lower middle of two
    assert moemesh["tokens_identical"] is False  # one run's tokens differed: the row says so
    assert [r["gb_s"] for r in moemesh["runs"]] == [0.11, 0.13]
    assert moemesh["cost_vs_all_local"] == pytest.approx(2.2 / 2.5)
    assert moemesh["cost_vs_all_local_range"] == pytest.approx([2.2 / 2.5, 2.6 / 2.5])


def test_without_all_local_there_is_no_cost_ratio():
    rows = summarise_runs({"remoe": [run(1.0, 1.0)]})
    assert rows["remoe"]["cost_vs_all_local"] is None and rows["remoe"]["cost_vs_all_local_range"] is None


def test_the_replays_reference_decodes_each_prompt_alone_as_the_replay_sends_them():
    """The policy replay sends prompts one after another, so its reference is each prompt decoded
    alone (in bfloat16 a row's batch changes its logits enough to flip a near-tie)."""
    from mesh.bench_dataplane import in_process_decode
    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.tokenizer import Tokenizer

    prompts = ["The purpose of a license is", "def fibonacci(n):"]
    result = in_process_decode(prompts, 3, {}, one_at_a_time=True)
    path = resolve_model_path("bundled")
    model, tok = Checkpoint(path).load_model(), Tokenizer.from_dir(path)
    params = SamplingParams(max_new_tokens=3, stop_at_eos=False)
    alone = [Engine(model).complete([tok.encode(p)], params)[0] for p in prompts]
    assert result["tokens"] == alone and all(len(t) == 3 for t in alone)
    assert len(result["tpot_s"]) == 2
