"""`moemesh profile` end to end on the tiny checkpoint: real node daemons (two: the sweep's CFS
period and the compared one), real workers with real cgroup limits where writable, a small
sweep. Timing is measured, not asserted: the tests check the record, not the speed.

Then its pieces, fast: the control-plane pieces it shares with the coordinator
(mesh/control.py) against a DEALER playing the daemon, the Caller against a ROUTER playing a
worker, and the fits on samples whose answer is known."""

from __future__ import annotations

import contextlib
import io
import json
import math
import threading

import numpy as np
import psutil
import pytest
import torch
import zmq

from allocator.coldstart import SPAWN_PATH_SHARES, simulate_node
from allocator.model import ModelShape
from allocator.profiles import FAMILIES, Profiles
from mesh import planning
from mesh.cli import main as cli_main
from mesh.config import load_config
from mesh.control import register_ack, spawn_request
from mesh.errors import MeshError
from mesh.profile_store import default_host, profile_path, stale_reason
from mesh.profiling.caller import Caller
from mesh.profiling.fit import expert_points, fit_profiles
from mesh.profiling.node import HEARTBEAT_S, KEEP_ALIVE_S, LIVENESS, ControlPlane, node_config
from mesh.protocol import (
    ExpertCall,
    ExpertResult,
    InstanceStopped,
    NodeRegister,
    Ping,
    SpawnFunction,
    StopFunction,
    decode,
    encode,
)
from mesh.sockets import harden
from nodes.limits import Cgroups
from nodes.model.config import MoEConfig

slow = pytest.mark.slow  # the end-to-end tests; the pieces' tests below take milliseconds


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")
    argv = ["profile", "--model", str(tiny_model), "--memory", "0.25,1", "--tokens", "1,4", "--calls", "3",
            "--cold-experts", "1,2", "--cold-repeats", "1", "--cold-burst", "6", "--period-seconds", "0.2",
            "--period-us", "10000", "--period-us-compare", "100000", "--out", str(out), "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(argv)
    path = profile_path(out, default_host(), tiny_model.name)
    return {"code": code, "out": out, "path": path, "text": stdout.getvalue(), "model": tiny_model}


@slow
def test_profile_writes_a_profile_that_round_trips(profiled):
    assert profiled["code"] == 0, profiled["text"]
    text = profiled["path"].read_text()
    profiles = Profiles.from_json(text)
    assert profiles.model == profiled["model"].name
    assert profiles.host == default_host()
    assert Profiles.from_json(profiles.to_json()) == profiles
    data = json.loads(text)["measurement"]
    assert {(p["memory_gb"], p["tokens"]) for p in data["points"]} == {(0.25, 1), (0.25, 4), (1.0, 1), (1.0, 4)}
    for p in data["points"]:  # speed is measured, not asserted: only that it was measured
        assert p["expert_s"] > 0 and p["round_trip_s"]["median"] > 0 and p["compute_s"]["n"] == 3
        assert p["round_trip_s"]["p90"] >= p["round_trip_s"]["median"]
    assert [c["experts"] for c in data["cold_starts"]] == [1, 2]
    assert data["cold_starts"][1]["bytes"] > data["cold_starts"][0]["bytes"] > 0
    assert all(set(c["stages"]) == {"spawn", "limits", "weights", "ready"} for c in data["cold_starts"])
    burst = data["cold_burst"]  # six functions requested at once, then the spawn path's weight fitted
    assert burst["functions"] == 6 and len(burst["init_s"]) == len(burst["ready_s"]) == 6
    # spread over the config's CPU nodes (the built-in defaults: cpu0 and cpu1), a daemon each
    assert [n["name"] for n in burst["nodes"]] == ["cpu0", "cpu1"] and sorted(burst["node"]) == [0, 0, 0, 1, 1, 1]
    assert burst["init_sum_s"] == pytest.approx(sum(burst["init_s"])) and min(burst["bytes"]) > 0
    assert burst["last_ready_s"] == max(burst["ready_s"]) > 0
    assert profiles.spawn_shares == burst["fit"]["spawn_shares"] > 0
    assert burst["fit"]["init_sum_s"]["measured"] == burst["init_sum_s"]
    assert [p["period_us"] for p in data["period_comparison"]] == [10_000, 100_000]


@slow
def test_both_fits_exist_and_the_stored_one_is_the_best(profiled):
    data = json.loads(profiled["path"].read_text())
    profiles = Profiles.from_dict(data)
    expert_reports = {r.family: r for r in profiles.reports if r.family in FAMILIES}
    assert set(expert_reports) == set(FAMILIES)
    assert all(math.isfinite(r.rmse_s) for r in expert_reports.values())
    stored = profiles.expert.curve.family
    assert stored == data["measurement"]["chosen_family"]
    assert expert_reports[stored].residual_standard_error_s <= min(
        r.residual_standard_error_s for r in expert_reports.values()
    )
    assert {"scatter_gather", "cold_start"} <= {r.family for r in profiles.reports}
    for family in FAMILIES:
        assert family in profiled["text"]  # the fit errors are printed


@slow
def test_pngs_and_the_printed_tables(profiled):
    folder = profiled["path"].parent
    for png in (folder / f"{profiled['model'].name}-fits.png", folder / f"{profiled['model'].name}-period.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = profiled["text"]
    assert "expert calls" in text and "cold start" in text and "CFS period" in text
    assert "100 ms" in text and "10 ms" in text


@slow
def test_cgroup_enforcement_is_recorded_and_said(profiled):
    data = json.loads(profiled["path"].read_text())["measurement"]
    enforced = data["cgroups"]["enforced"]
    writable = Cgroups("probe").probe() == ""
    assert enforced == writable, data["cgroups"]
    if enforced:
        shares = [p["cgroups"]["values"]["cpu_quota_us"] / p["cgroups"]["values"]["cpu_period_us"]
                  for p in data["period_comparison"]]
        assert shares == [0.25, 0.25]
    else:
        assert "CPU SHARE NOT ENFORCED" in profiled["text"]


@slow
def test_nothing_is_left_running(profiled):
    assert profiled["code"] == 0
    alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


@slow
def test_profiles_of_loads_the_stored_profile_else_synthetic(profiled, tmp_path):
    config = load_config(None, {"model.path": str(profiled["model"])})
    model = MoEConfig.from_file(profiled["model"])
    stored = Profiles.from_json(profiled["path"].read_text())
    loaded = planning.profiles_of(config, model, profiles_dir=profiled["out"])
    assert loaded.expert == stored.expert and loaded.cold_start == stored.cold_start
    assert loaded.shape == planning.model_shape(model)
    synthetic = planning.profiles_of(config, model, profiles_dir=tmp_path)  # none stored: said loudly
    assert synthetic == Profiles.synthetic(planning.model_shape(model), host="synthetic")
    measured = load_config(None, {"model.path": str(profiled["model"]), "policy.profiles": "measured"})
    with pytest.raises(MeshError, match="no measured profiles"):
        planning.profiles_of(measured, model, profiles_dir=tmp_path)


@slow
def test_a_profile_from_before_the_burst_is_measured_again(profiled, tmp_path):
    """mesh-up's first-use measurement ([policy] profiles = "auto") re-measures a stored profile
    that has no cold-start burst: its spawn-path weight would be the built-in one."""
    assert stale_reason(profiled["path"]) is None
    assert stale_reason(profiled["path"], smallest_gb=0.25) is None
    assert "sweeps functions from 0.25 GB" in stale_reason(profiled["path"], smallest_gb=0.125)
    assert "none measured" in stale_reason(tmp_path / "missing.json")
    old = json.loads(profiled["path"].read_text())
    del old["measurement"]["cold_burst"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert "predates the cold-start burst" in stale_reason(tmp_path / "old.json")
    unsplit = json.loads(profiled["path"].read_text())
    del unsplit["init_fixed_s"]  # fitted before INIT's cgroup join was split from its CPU work
    (tmp_path / "unsplit.json").write_text(json.dumps(unsplit))
    assert "no init_fixed_s" in stale_reason(tmp_path / "unsplit.json")
    (tmp_path / "bad.json").write_text("{")
    assert "unreadable" in stale_reason(tmp_path / "bad.json")


def test_first_use_profiles_sweep_down_to_the_smallest_function_a_plan_may_size(tmp_path):
    """The first-use sweep (sized_for) starts at [functions] min_memory_gb where one expert fits
    there (the bundled model's, Qwen's), so no plan's call time is extrapolated below the sweep;
    a Mixtral expert (336 MB in bf16) does not fit and starts at its own size. The burst keeps
    its 0.25 GB multiple either way."""
    from mesh.profile_store import sized_for
    from nodes.synth.presets import get_preset

    bundled = sized_for(load_config(None, {}))
    assert bundled["memory"] == (0.125, 0.25, 0.5, 1.0, 2.0) and bundled["burst_memory"] == 0.25
    for name, first in (("qwen1.5-moe-a2.7b", 0.125), ("mixtral-8x7b", 0.75)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(get_preset(name).hf_config(2)))
        sizes = sized_for(load_config(None, {"model.path": str(folder), "model.dtype": "bfloat16"}))
        assert sizes["memory"][0] == first and sizes["burst_memory"] >= 0.25
        assert sizes["burst_memory"] in sizes["memory"]


# ------------------------------------------------------------------ the pieces, without daemons

DEADLINE_MS = 10_000  # generous: a busy 2-core machine; a test waits on the message, not the clock


def _recv(sock: zmq.Socket):
    assert sock.poll(DEADLINE_MS), "no message within the deadline"
    return decode(sock.recv_multipart())


def test_spawn_request_is_the_coordinators_and_scales_the_cpu_share():
    config = load_config(None, {"functions.gb_per_vcpu": 2.0, "functions.keep_alive_s": 12.0,
                                "functions.start_delay_s": 0.5, "functions.spawn": "fresh"})
    msg = spawn_request("i-1", "fn", [(1, 3), (0, 2)], 1.5, config, "/m")
    assert msg == SpawnFunction(instance_id="i-1", function_id="fn", experts=[(1, 3), (0, 2)], memory_gb=1.5,
                                cpu_share=0.75, keep_alive_s=12.0, spawn="fresh", model_path="/m",
                                start_delay_s=0.5, device="cpu")
    assert spawn_request("i-2", "fn", [(0, 0)], 1.0, config, "/m", node_kind="gpu").device == "cuda"
    assert decode(encode(msg)) == msg


def test_node_config_keeps_the_mesh_config_and_fixes_what_the_profile_needs():
    config = load_config(None, {"functions.keep_alive_s": 5.0, "functions.start_delay_s": 1.0,
                                "functions.gb_per_vcpu": 2.0})
    node = node_config(config, "p0", 20_000)
    assert [n.name for n in node.nodes] == ["p0"] and node.nodes[0].kind == "cpu"
    f = node.functions
    assert (f.cfs_period_us, f.keep_alive_s, f.start_delay_s, f.gb_per_vcpu) == (20_000, KEEP_ALIVE_S, 0.0, 2.0)
    assert (node.coordinator.heartbeat_s, node.coordinator.liveness) == (HEARTBEAT_S, LIVENESS)
    assert node.model == config.model and node.security == config.security
    # what the profiler asks for is what the coordinator would ask for under this config
    assert spawn_request("i", "f", [(0, 0)], 1.0, node, "/m").keep_alive_s == KEEP_ALIVE_S


def test_control_plane_acks_pings_forwards_and_waits():
    config = node_config(load_config(None, {}), "p-test", 10_000)
    plane = ControlPlane("p-test", config)
    plane.start()
    context = zmq.Context()
    daemon = context.socket(zmq.DEALER)
    daemon.setsockopt(zmq.IDENTITY, b"p-test")
    daemon.setsockopt(zmq.LINGER, 0)
    daemon.connect(plane.endpoint)
    try:
        daemon.send_multipart(encode(NodeRegister(node_id="p-test", kind="cpu", host="127.0.0.1", capacity_gb=1.0,
                                                  cpus=1.0, pid=1, zygote=False)))
        seen = [_recv(daemon), _recv(daemon)]  # the ack, and the first ping (before or after it)
        assert register_ack("p-test", config) in seen
        assert any(isinstance(m, Ping) for m in seen)
        plane.send(StopFunction("i-1", "requested"))
        while not isinstance(msg := _recv(daemon), StopFunction):
            assert isinstance(msg, Ping)
        assert msg.instance_id == "i-1"
        assert isinstance(plane.wait_for(lambda m: isinstance(m, NodeRegister), 10.0, lambda: True), NodeRegister)
        daemon.send_multipart(encode(InstanceStopped(instance_id="i-1", node_id="p-test", reason="requested",
                                                     exit_code=0, started_at=0.0, stopped_at=1.0)))
        stopped = plane.wait_for(lambda m: isinstance(m, InstanceStopped), 10.0, lambda: True)
        assert stopped.instance_id == "i-1"
        with pytest.raises(MeshError) as dead:
            plane.wait_for(lambda m: isinstance(m, InstanceStopped), 10.0, lambda: False)
        assert dead.value.code == "function_failed"
        with pytest.raises(MeshError) as late:
            plane.wait_for(lambda m: isinstance(m, InstanceStopped), 0.0, lambda: True)
        assert late.value.code == "timeout"
    finally:
        daemon.close(linger=0)
        context.term()
        plane.close()
    assert not plane.is_alive()


class FakeWorker(threading.Thread):
    """A worker's data ROUTER (hardened as the mesh's) that answers each call with `answer(call)`."""

    def __init__(self, answer) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        harden(self.sock, "data", bind="tcp://127.0.0.1:0")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.done = threading.Event()
        self.calls: list[ExpertCall] = []

    def run(self) -> None:
        while not self.done.is_set():
            if self.sock.poll(20):
                identity, *frames = self.sock.recv_multipart()
                call = decode(frames)
                self.calls.append(call)
                self.sock.send_multipart([identity, *encode(self.answer(call))])
        self.sock.close(linger=0)
        self.context.term()


def test_caller_times_calls_and_refuses_a_wrong_answer():
    worker = FakeWorker(lambda call: ExpertResult(call_id=call.call_id, compute_s=0.002, y=call.x * 2))
    worker.start()
    try:
        with Caller(worker.endpoint, 8, torch.float32, load_config(None, {})) as caller:
            rt, compute = caller.call(1, 3, 4)
            assert rt > 0 and compute == 0.002
            caller.call(1, 3, 4)
        first, second = worker.calls
        assert (first.layer, first.expert_ids, first.counts, tuple(first.x.shape)) == (1, [3], [4], (4, 8))
        assert torch.equal(first.x, second.x) and second.call_id == first.call_id + 1  # one input per size
    finally:
        worker.done.set()
        worker.join(10)
    wrong = FakeWorker(lambda call: ExpertResult(call_id=call.call_id + 7, compute_s=0.0, y=call.x))
    wrong.start()
    try:
        with Caller(wrong.endpoint, 8, torch.float32) as caller, pytest.raises(MeshError) as exc:
            caller.call(0, 0, 1)
        assert exc.value.code == "function_failed"
    finally:
        wrong.done.set()
        wrong.join(10)


def _samples(stall_s: float):
    """Known samples: compute = 0.1 ms + 0.1 ms / min(memory, 1) + 0.01 ms per token; transport =
    0.4 ms + bytes / 1 GB/s; the 0.25 GB size stalls one call in ten by stall_s (a CFS throttle)."""
    samples = {}
    for memory in (0.25, 1.0):
        for tokens in (1, 4):
            compute = 1e-4 + 1e-4 / min(memory, 1.0) + 1e-5 * tokens
            transport = 4e-4 + 2 * tokens * 32 / 1e9
            rts = [compute + transport + (stall_s if memory < 1 and i == 9 else 0.0) for i in range(10)]
            samples[(memory, tokens)] = {"round_trip_s": rts, "compute_s": [compute] * 10,
                                         "round_means_s": [float(np.mean(rts))] * 3}
    return samples


def test_expert_points_subtract_the_transport_and_keep_the_stalls():
    rows, overhead = expert_points(_samples(1e-3), (0.25, 1.0), (1, 4), 32, saturation_gb=1.0)
    assert overhead == pytest.approx({1: 4e-4 + 64 / 1e9, 4: 4e-4 + 256 / 1e9})
    by = {(r["memory_gb"], r["tokens"]): r for r in rows}
    assert [(r["memory_gb"], r["tokens"]) for r in rows] == [(0.25, 1), (0.25, 4), (1.0, 1), (1.0, 4)]
    assert by[(1.0, 1)]["expert_s"] == pytest.approx(2e-4 + 1e-5)
    # the median of one size's calls never sees its stalls; the mean (what the fit takes) does
    small = by[(0.25, 4)]
    assert small["round_trip_s"]["median"] == pytest.approx(5e-4 + 4e-5 + overhead[4])
    assert small["expert_s"] == pytest.approx(5e-4 + 4e-5 + 1e-4)
    assert small["bytes"] == 256 and small["compute_s"]["n"] == 10


def test_the_billed_curve_is_the_workers_compute_without_the_stalls():
    """A 0.25 GB function waits out CFS stalls before its calls start: the caller's latency curve
    holds them, the billed one (the workers' own compute, what invocation billing bills) does not."""
    rows, overhead = expert_points(_samples(5e-3), (0.25, 1.0), (1, 4), 32, saturation_gb=1.0)
    shape = ModelShape(moe_layers=2, experts_per_layer=4, top_k=2, hidden=8, bytes_per_expert=768,
                       main_bytes=10_000, kv_bytes_per_token=64, activation_bytes=32, name="t")
    cold = [{"experts": 1, "bytes": 100_000, "seconds": 0.05, "stages": {}}]
    p = fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, saturation_gb=1.0).profiles
    for memory, tokens in ((0.25, 1), (0.25, 4), (1.0, 1)):
        compute = 1e-4 + 1e-4 / min(memory, 1.0) + 1e-5 * tokens
        assert float(p.billed_expert.seconds(memory, tokens)) == pytest.approx(compute, rel=0.1)
    assert float(p.expert.seconds(0.25, 1)) > 1.5 * float(p.billed_expert.seconds(0.25, 1))  # the stall
    assert Profiles.from_json(p.to_json()).billed_expert == p.billed_expert


def test_fit_profiles_recovers_known_lines_and_stores_the_best_curve():
    rows, overhead = expert_points(_samples(0.0), (0.25, 1.0), (1, 4), 32, saturation_gb=1.0)
    cold = [{"experts": n, "bytes": n * 100_000, "seconds": 0.05 + n * 100_000 / 1e7, "stages": {}} for n in (1, 2, 4)]
    # an expert reads 50 kB (bf16 on disk) and is served as 100 kB (float32): the cold start is
    # keyed on the served bytes, what the estimator asks for
    cold = [{**c, "bytes": c["bytes"] // 2} for c in cold]
    shape = ModelShape(moe_layers=2, experts_per_layer=4, top_k=2, hidden=8, bytes_per_expert=100_000,
                       main_bytes=10_000, kv_bytes_per_token=64, activation_bytes=32, name="t")
    fitted = fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, saturation_gb=1.0)
    p = fitted.profiles
    assert (p.host, p.model, p.shape) == ("h", "tiny", shape)
    assert p.cold_start.intercept == pytest.approx(0.05) and p.cold_start.bandwidth == pytest.approx(1e7)
    assert p.scatter_gather.intercept == pytest.approx(4e-4) and p.scatter_gather.bandwidth == pytest.approx(1e9)
    experts = [r for r in p.reports if r.family in FAMILIES]
    assert p.expert.curve.family == min(experts, key=lambda r: r.residual_standard_error_s).family
    assert [r.family for r in p.reports if r.family not in FAMILIES] == ["scatter_gather", "cold_start"]
    assert fitted.points.shape == (4, 3) and set(fitted.fit.candidates) == set(FAMILIES)
    for family in FAMILIES:
        assert fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, 1.0, family).profiles.expert.curve.family \
            == family
    assert fitted.burst is None and p.spawn_shares == SPAWN_PATH_SHARES  # no burst measured: the default

    # A burst whose INIT the model makes with weight 2 is fitted back to 2.
    cold = [{**c, "stages": {"spawn": 0.01}} for c in cold]
    base = fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, 1.0).profiles
    assert base.spawn_s == pytest.approx(0.01)  # the median fork stage, as Profiles.from_dict reads it
    alone = [float(base.init_s(100_000))] * 12
    ready, init = simulate_node(2.0, [0.01] * 12, alone, spawn_shares=2.0)
    burst = {"node": [0] * 12, "cpus": [2.0] * 12, "bytes": [100_000] * 12, "init_s": list(init),
             "init_sum_s": float(init.sum()), "ready_s": list(ready), "last_ready_s": float(ready.max())}
    fitted = fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, 1.0, burst=burst)
    assert fitted.profiles.spawn_shares == pytest.approx(2.0)
    assert fitted.burst["init_sum_s"]["modelled"] == pytest.approx(burst["init_sum_s"])
    assert fitted.burst["last_ready_s"]["modelled"] == pytest.approx(burst["last_ready_s"])
    assert Profiles.from_json(fitted.profiles.to_json()).spawn_shares == pytest.approx(2.0)
    assert fitted.burst["explained"]
    # A burst whose INIT no sharing of the CPUs makes (10x the work): the built-in weight is kept.
    slow = {**burst, "init_sum_s": 10 * burst["ready_s"][-1] * 12}
    unexplained = fit_profiles(rows, overhead, cold, shape, "h", "tiny", 32, 1.0, burst=slow)
    assert not unexplained.burst["explained"] and unexplained.profiles.spawn_shares == SPAWN_PATH_SHARES

    one = fit_profiles(rows, overhead, cold[:1], shape, "h", "tiny", 32, 1.0).profiles.cold_start
    assert (one.intercept, one.bandwidth) == (pytest.approx(cold[0]["seconds"]), math.inf)  # one size: no slope


def test_cold_starts_measured_below_a_vcpu_are_fitted_as_on_a_full_one():
    """The cgroup join ("limits") is INIT's fixed part; the rest of a cold start measured at a
    quarter of a vCPU is CPU work at that quota, a quarter as long on a full vCPU."""
    rows, overhead = expert_points(_samples(0.0), (0.25, 1.0), (1, 4), 32, saturation_gb=1.0)
    shape = ModelShape(moe_layers=2, experts_per_layer=4, top_k=2, hidden=8, bytes_per_expert=768,
                       main_bytes=10_000, kv_bytes_per_token=64, activation_bytes=32, name="t")
    stages = {"spawn": 0.02, "limits": 0.01, "weights": 0.12, "ready": 0.0}
    quarter = [{"experts": 1, "bytes": 100_000, "seconds": 0.15, "cpu_share": 0.25, "stages": stages}]
    p = fit_profiles(rows, overhead, quarter, shape, "h", "tiny", 32, 1.0).profiles
    assert p.init_fixed_s == pytest.approx(0.01) and p.spawn_s == pytest.approx(0.02)
    assert p.cold_start.intercept == pytest.approx(0.02 + 0.01 + 0.03)  # 0.12 s at a quarter: 0.03 s
    assert float(p.init_s(100_000)) == pytest.approx(0.03)
    full = fit_profiles(rows, overhead, [{**quarter[0], "cpu_share": 1.0}], shape, "h", "tiny", 32, 1.0).profiles
    assert full.cold_start.intercept == pytest.approx(0.15)  # measured on a full vCPU: as it is
