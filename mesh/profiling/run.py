"""run_profile: measure (measure.py), fit (fit.py), write the profile JSON and the two PNGs.

    <out>/<host>/<model>.json        allocator.profiles.Profiles JSON + a "measurement" section
    <out>/<host>/<model>-fits.png    both expert fits against the measured points
    <out>/<host>/<model>-period.png  round trips over time and their distribution per CFS period
"""

from __future__ import annotations

import json
import os
import time

import torch

from allocator.profiles import FAMILIES, plot_fits
from mesh import planning
from mesh.config import load_config
from mesh.errors import MeshError
from mesh.profile_store import default_host, profile_path
from mesh.profiling.fit import expert_points, fit_profiles
from mesh.profiling.measure import Progress, measure, steps
from mesh.profiling.report import plot_period
from mesh.profiling.settings import ASSUMED, MEASURED, Settings
from nodes.model.config import MoEConfig

FITTED_QUANTITY = "median over rounds of the round's mean round trip, minus the transport overhead of the call size (seconds)"


def _check(s: Settings) -> None:
    if s.cold_repeats < 1 or s.calls < 1 or s.rounds < 1 or len(set(s.memory)) < 2 or not s.tokens or not s.cold_experts:
        raise MeshError("profile: need --calls, --rounds and --cold-repeats >= 1, two or more --memory sizes, "
                        "--tokens and --cold-experts", code="config_error", hint="see `moemesh profile --help`")
    if s.family not in ("best", *FAMILIES):
        raise MeshError(f"--family {s.family!r}: expected best or one of {', '.join(FAMILIES)}",
                        code="config_error", hint="see `moemesh profile --help`")


def run_profile(s: Settings) -> dict:
    """Measure, fit, write the JSON and PNGs; returns what was written and measured:
    {"path", "fits_png", "period_png", "profiles", "fit", "rows", "cold", "periods", "enforced",
    "skipped", "data"} (data: the JSON written; render() prints it)."""
    overrides: dict[str, object] = {"model.path": s.model} if s.model else {}
    if s.dtype:
        overrides["model.dtype"] = s.dtype
    if s.period_us is not None:
        overrides["functions.cfs_period_us"] = s.period_us
    config = load_config(s.config, overrides)
    _check(s)
    model_path = config.model.resolved_path()
    model_name = model_path.resolve().name
    model = MoEConfig.from_file(model_path)
    shape = planning.model_shape(model, planning.dtype_bytes(config), name=model_name)  # as the functions hold it
    if max(s.cold_experts) > model.num_experts * model.num_moe_layers or min(s.cold_experts) < 1:
        raise MeshError(f"--cold-experts {','.join(map(str, s.cold_experts))}: {model_name} has "
                        f"{model.num_experts * model.num_moe_layers} experts", code="config_error",
                        hint="give counts from 1 to the model's number of experts")
    host = s.host or default_host()
    f = config.functions
    activation_bytes = model.hidden_size * torch.tensor([], dtype=getattr(torch, config.model.dtype)).element_size()
    saturation = s.saturation_gb if s.saturation_gb is not None else f.threads_per_function * f.gb_per_vcpu
    memory = tuple(sorted(set(s.memory)))
    tokens = tuple(sorted(set(s.tokens)))
    progress = Progress(steps(s, config), s.quiet)
    started = time.time()
    load_before = os.getloadavg()[0]
    measured = measure(config, s, model_path, model, memory, tokens, progress)
    progress.show("fitting")

    rows, overhead = expert_points(measured.samples, memory, tokens, activation_bytes, saturation)
    fitted = fit_profiles(rows, overhead, measured.cold, shape, host, model_name, activation_bytes, saturation,
                          s.family, measured.burst)
    profiles, fit = fitted.profiles, fitted.fit
    cgroups, periods = measured.cgroups, measured.periods
    states = cgroups + [p["cgroups"] for p in periods]
    enforced = all(c["enforced"] for c in states)
    skipped = sorted({c["skipped"] for c in states if c["skipped"]})
    data = json.loads(profiles.to_json())
    data["measurement"] = {
        "host": host, "model": model_name, "model_path": str(model_path), "at": started,
        "duration_s": time.time() - started, "cpus": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "measured": list(MEASURED), "assumed": list(ASSUMED),
        "cgroups": {"enforced": enforced, "skipped": skipped, "per_memory": cgroups},
        "functions": {"gb_per_vcpu": f.gb_per_vcpu, "cfs_period_us": f.cfs_period_us,
                      "threads_per_function": f.threads_per_function, "spawn": f.spawn, "dtype": config.model.dtype},
        "fitted_quantity": FITTED_QUANTITY,
        "saturation_gb": saturation, "chosen_family": profiles.expert.curve.family, "family_option": s.family,
        "points": rows, "transport_overhead_s": {str(t): overhead[t] for t in tokens},
        "cold_starts": measured.cold,
        "cold_burst": {**(measured.burst or {}), "fit": fitted.burst} if measured.burst else None,
        "period_comparison": [{k: v for k, v in p.items() if k != "trace"} for p in periods],
    }
    path = profile_path(s.out, host, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)
    fits_png = path.with_name(f"{model_name}-fits.png")
    period_png = path.with_name(f"{model_name}-period.png")
    plot_fits(fitted.points, {f"{k} fit": v for k, v in fit.candidates.items()}, fits_png)
    plot_period(periods, period_png)
    progress.done()
    return {"path": path, "fits_png": fits_png, "period_png": period_png, "profiles": profiles, "fit": fit,
            "rows": rows, "cold": measured.cold, "burst": fitted.burst, "periods": periods, "enforced": enforced, "skipped": skipped,
            "data": data}
