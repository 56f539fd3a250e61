"""`moemesh profile` end to end on the tiny checkpoint: real node daemons (two: the sweep's CFS
period and the compared one), real workers with real cgroup limits where writable, a small
sweep. Timing is measured, not asserted: the tests check the record, not the speed."""

from __future__ import annotations

import contextlib
import io
import json
import math

import psutil
import pytest

from allocator.profiles import FAMILIES, Profiles
from mesh import planning
from mesh.cli import main as cli_main
from mesh.config import load_config
from mesh.errors import MeshError
from mesh.profile import default_host, profile_path
from nodes.limits import Cgroups
from nodes.model.config import MoEConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profiled(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")
    argv = ["profile", "--model", str(tiny_model), "--memory", "0.25,1", "--tokens", "1,4", "--calls", "3",
            "--cold-experts", "1,2", "--cold-repeats", "1", "--period-seconds", "0.2",
            "--period-us", "10000", "--period-us-compare", "100000", "--out", str(out), "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(argv)
    path = profile_path(out, default_host(), tiny_model.name)
    return {"code": code, "out": out, "path": path, "text": stdout.getvalue(), "model": tiny_model}


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
    assert [p["period_us"] for p in data["period_comparison"]] == [10_000, 100_000]


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


def test_pngs_and_the_printed_tables(profiled):
    folder = profiled["path"].parent
    for png in (folder / f"{profiled['model'].name}-fits.png", folder / f"{profiled['model'].name}-period.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = profiled["text"]
    assert "expert calls" in text and "cold start" in text and "CFS period" in text
    assert "100 ms" in text and "10 ms" in text


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


def test_nothing_is_left_running(profiled):
    assert profiled["code"] == 0
    alive = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


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
