"""The meter's arithmetic, on a fake clock (the end-to-end ledgers are in test_mesh_billing.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.meter import Meter, Prices


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meter(mode: str, **prices) -> tuple[Meter, Clock]:
    clock = Clock()
    return Meter(Prices(mode=mode, **prices), {"interactive": (1.0, 0.1)}, straggler_k=3.0, clock=clock), clock


def start(m: Meter, clock: Clock, iid: str, fn: str, memory: float, init: float = 0.5) -> None:
    m.instance_requested(iid, fn, "n0", memory, [(0, 0)], 0, "zygote", 30.0)
    m.instance_ready(iid, clock.now, {"spawn": init / 2, "limits": 0.0, "weights": init / 2, "ready": 0.0})


def test_instance_mode_bills_memory_times_lifetime_and_the_main_function():
    m, clock = meter("instance")
    m.set_main(2.0, baseline_memory_gb=3.0)
    start(m, clock, "a", "f", 0.5)
    clock.now += 10
    m.instance_stopped("a", clock.now, "idle")
    clock.now += 5  # a stopped instance costs nothing more
    b = m.billing()
    assert b["gb_s_experts"] == pytest.approx(0.5 * 10)
    assert b["gb_s_main"] == pytest.approx(2.0 * 15)
    assert b["baseline_all_local_gb_s"] == pytest.approx(3.0 * 15)
    assert b["cost"] == pytest.approx((5 + 30) * Prices().cpu_gb_s)


def test_invocation_mode_bills_each_calls_own_time_rounded_up_plus_init():
    m, clock = meter("invocation", round_ms=1.0)
    m.set_main(1.0)
    start(m, clock, "a", "f", 0.25, init=0.4)
    for _ in range(3):
        m.invocation("a", latency_s=0.010, compute_s=0.0021)  # billed 3 ms each, not the 10 ms round trip
    m.main_busy(2.0)
    b = m.billing()
    assert b["gb_s_experts"] == pytest.approx(0.25 * (3 * 0.003 + 0.2))  # INIT = weights, not the fork
    assert b["gb_s_main"] == pytest.approx(1.0 * 2.0)
    assert b["invocations"] == 3


def test_a_re_plans_expert_load_is_billed_to_the_main_and_not_to_the_all_local_baseline():
    """Memory held = memory billed: the seconds a re-plan spends loading experts into the main
    are billed at the size it grew to (invocation mode, with INIT billed), beside its busy time;
    the all-local baseline, which holds them from the start, is not charged for them."""
    m, _ = meter("invocation")
    m.set_main(4.0, baseline_memory_gb=4.0)
    m.main_busy(1.0)
    m.main_loaded([(0, 1), (0, 2)], 2.5, "re-plan")
    b = m.billing()
    assert b["gb_s_main"] == pytest.approx(4.0 * 1.0 + 4.0 * 2.5) and b["gb_s_main_loads"] == pytest.approx(10.0)
    assert b["baseline_all_local_gb_s"] == pytest.approx(4.0 * 1.0)
    assert m.snapshot()["cold_starts"][-1]["stages"] == {"weights": 2.5}
    free, _ = meter("invocation", bill_init=False)
    free.set_main(4.0)
    free.main_loaded([(0, 1)], 2.5, "re-plan")
    assert free.billing()["gb_s_main"] == 0.0


def test_a_resized_main_function_keeps_earlier_time_at_its_earlier_size():
    m, clock = meter("instance")
    m.set_main(1.0)
    clock.now += 10
    m.set_main(4.0)
    clock.now += 10
    assert m.billing()["gb_s_main"] == pytest.approx(1.0 * 10 + 4.0 * 10)


def test_retired_instances_keep_their_billing_and_leave_the_feed():
    m, clock = meter("instance")
    m.keep_stopped = 2
    for i in range(6):
        start(m, clock, f"i{i}", f"f{i % 2}", 1.0)
        clock.now += 1
        m.instance_stopped(f"i{i}", clock.now, "idle")
    b = m.billing()
    assert b["gb_s_experts"] == pytest.approx(6.0)
    assert b["by_function"]["f0"]["gb_s"] == pytest.approx(3.0) and b["by_function"]["f1"]["gb_s"] == pytest.approx(3.0)
    assert len(m.snapshot()["instances"]) == 2


def test_stragglers_are_replies_beyond_k_times_the_round_median():
    m, _ = meter("instance")
    flagged = m.scatter_round(3, [("a", "fa", 0.001), ("b", "fb", 0.0012), ("c", "fc", 0.010)])
    assert [f["instance_id"] for f in flagged] == ["c"] and flagged[0]["layer"] == 3
    assert m.scatter_round(3, [("a", "fa", 0.001), ("b", "fb", 0.0025)]) == []


def test_slo_attainment_and_percentiles_per_class():
    m, clock = meter("instance")
    for i, (ttft, step) in enumerate([(0.2, 0.05), (2.0, 0.05), (0.3, 0.5)]):
        m.request_admitted(f"r{i}", "interactive", 5)
        clock.now += ttft
        m.token(f"r{i}")
        for _ in range(4):
            clock.now += step
            m.token(f"r{i}")
        record = m.request_done(f"r{i}", "length")
        assert record["ttft_s"] == pytest.approx(ttft) and record["tpot_s"] == pytest.approx(step)
    slo = m.snapshot()["slo"]["classes"]["interactive"]
    assert (slo["requests"], slo["attained"]) == (3, 1)  # one late first token, one slow decode
    assert slo["ttft"]["p50"] == pytest.approx(0.3)


def test_layer_load_imbalance():
    m, _ = meter("instance")
    m.layer_load(0, np.array([6, 2, 0, 0]), layers=2)
    assert m.imbalance[0] == pytest.approx(6 / 2)
    assert m.snapshot()["load"]["counts"] == [[6, 2, 0, 0], [0, 0, 0, 0]]


def test_idle_times_per_function_feed_the_adaptive_keep_alive():
    from allocator.keepalive import decide
    from mesh.config import load_config
    from mesh.control import spawn_request
    from mesh.meter import IDLE_GAP_S, Reply, RoundRecord

    meter = Meter(Prices(), {"default": (1.0, 0.5)}, clock=lambda: 0.0)
    t = 100.0
    for gap in [3.0] * 12:  # a request every 3 s, each a burst of rounds 10 ms apart
        t += gap
        for step in range(5):
            meter.post(RoundRecord(0, 1, np.zeros(4, dtype=np.int64), [], [Reply("i", "fn", 0.001, 0.001, 1)], calls=1,
                                   at=t + 0.01 * step))
    idle = meter.idle_times("fn")
    assert len(idle) == 11 and all(abs(x - (3.0 - 0.04)) < 1e-9 for x in idle)  # bursts merged
    assert min(idle) >= IDLE_GAP_S and meter.idle_times("other") == []
    keep = decide("histogram", idle, fixed_s=30.0)
    assert keep.policy == "histogram" and 3.0 <= keep.keep_alive_s <= 4.5, keep  # p99 bin (+10 %), not 30 s
    config = load_config(None, {"functions.keep_alive_policy": "histogram"})
    msg = spawn_request("fn.0.0", "fn", [(0, 1)], 0.5, config, "/m", keep_alive_s=keep.keep_alive_s)
    assert msg.keep_alive_s == keep.keep_alive_s
    assert spawn_request("fn.0.0", "fn", [(0, 1)], 0.5, config, "/m").keep_alive_s == config.functions.keep_alive_s


def test_the_all_local_baseline_leaves_out_the_rounds_idle_waiting_for_cold_starts():
    """A main holding every expert never waits for a function's cold start: the baseline counts
    the main's busy seconds less its rounds' cold-start waits (invocation mode); the main itself
    is billed for all of them; instance mode's baseline is up as long as the mesh, waits or not."""
    from mesh.meter import RoundRecord, StepRecord

    m, _ = meter("invocation")
    m.set_main(0.5, baseline_memory_gb=4.0)
    m.post(RoundRecord(0, 1, np.zeros(2, dtype=np.int64), [], waited_for=["f.0"], seconds=2.5, cold_wait_s=2.0))
    m.post(StepRecord(3.0))  # the step that ran that round
    b = m.billing()
    assert b["gb_s_main"] == pytest.approx(0.5 * 3.0) and b["main_cold_wait_s"] == pytest.approx(2.0)
    assert b["baseline_all_local_gb_s"] == pytest.approx(4.0 * 1.0)
    held, clock = meter("instance")
    held.set_main(0.5, baseline_memory_gb=4.0)
    held.post(RoundRecord(0, 1, np.zeros(2, dtype=np.int64), [], waited_for=["f.0"], seconds=2.5, cold_wait_s=2.0))
    clock.now += 3.0
    assert held.billing()["baseline_all_local_gb_s"] == pytest.approx(4.0 * 3.0)
