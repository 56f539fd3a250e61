"""What `moemesh profile` shows: the printed tables (render) and the CFS-period plot (the fits'
plot is allocator.profiles.plot_fits)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from mesh.profiling.settings import ASSUMED


def plot_period(runs: list[dict], path: Path) -> None:
    """PNG: per-call round trip over time (left) and its distribution (right), one colour per period."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    over_time, cdf = figure.subplots(1, 2)
    for colour, run in zip(["tab:blue", "tab:red", "tab:green"], runs):
        label = f"{run['period_us'] / 1000:g} ms period"
        rt = np.asarray(run["trace"]["round_trip_s"]) * 1e3
        over_time.plot(run["trace"]["at_s"], rt, ".", ms=2, color=colour, label=label)
        ordered = np.sort(rt)
        cdf.plot(ordered, np.arange(1, ordered.size + 1) / ordered.size, color=colour, label=label)
    over_time.set_yscale("log")
    over_time.set_xlabel("time (s)")
    over_time.set_ylabel("round trip (ms)")
    share = runs[0]["cpu_share"] if runs else 0
    over_time.set_title(f"back-to-back calls at {share:.0%} of a vCPU")
    cdf.set_xscale("log")
    cdf.set_xlabel("round trip (ms)")
    cdf.set_ylabel("fraction of calls")
    cdf.set_title("distribution")
    for axes in (over_time, cdf):
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def render(result: dict) -> str:
    """The tables of a run_profile() result: expert calls and both fits, scatter-gather, cold
    starts, the CFS periods, what was written and what is assumed."""
    m = result["data"]["measurement"]
    out = [*_header(result, m), "", *_expert_calls(result, m), "", *_expert_fits(result, m), "",
           *_scatter_gather(result, m), "", *_cold_starts(result, m), "", *_periods(result["periods"]), "",
           f"wrote {result['path']}", f"      {result['fits_png']}", f"      {result['period_png']}",
           "assumed, not measured: " + ", ".join(ASSUMED)]
    return "\n".join(out)


def _header(result: dict, m: dict) -> list[str]:
    out = [f"moemesh profile: host {m['host']}, model {m['model']} ({m['cpus']} CPUs, "
           f"{m['functions']['threads_per_function']} thread(s) per function, "
           f"{m['functions']['gb_per_vcpu']:g} GB per vCPU, {m['duration_s']:.0f} s)"]
    if not result["enforced"]:
        banner = "!" * 78
        out += [banner, "!! CPU SHARE NOT ENFORCED: cgroup limits could not be applied, so every size ran",
                "!! at full speed and the memory curve below is NOT the platform's.",
                *(f"!! {why}" for why in result["skipped"]), banner]
    load = m["load_average_1min"]
    if max(load.values()) > 0.5 * (m["cpus"] or 1):
        out.append(f"note: the host was busy (1-min load average {load['before']:.1f} before, {load['after']:.1f} "
                   f"after, on {m['cpus']} CPUs): other processes' work is in these numbers")
    return out


def _expert_calls(result: dict, m: dict) -> list[str]:
    fit = result["fit"]
    out = ["expert calls, one expert per function (ms). rt: round trip; cmp: the worker's compute_s;",
           "  rt MoM: median over rounds of the round's mean round trip; expert = rt MoM - transport overhead",
           "  memory  vCPU  tokens   rt med   rt p90   rt MoM  cmp med  cmp p90   expert"
           + "".join(f" {k[:5]:>8}" for k in fit.candidates)]
    for r in result["rows"]:
        cpu = r["memory_gb"] / m["functions"]["gb_per_vcpu"]
        fits = "".join(_ms(float(v.seconds(r["memory_gb"], r["tokens"]))) + " " for v in fit.candidates.values())
        out.append(f"  {r['memory_gb']:5.2f}G {cpu:5.2f} {r['tokens']:7d} {_ms(r['round_trip_s']['median'])} "
                   f"{_ms(r['round_trip_s']['p90'])} {_ms(r['round_trip_s']['median_of_round_means'])} "
                   f"{_ms(r['compute_s']['median'])} {_ms(r['compute_s']['p90'])} {_ms(r['expert_s'])} "
                   + fits.rstrip())
    quota = []
    for c in m["cgroups"]["per_memory"]:
        th = c.get("throttling") or {}
        if th:
            quota.append(f"{c['memory_gb']:g} GB {th['throttled_periods']}/{th['periods']} periods, "
                         f"{th['throttled_s'] * 1e3:.0f} ms")
    if quota:
        out.append("  throttled by the CPU quota: " + "; ".join(quota))
    return out


def _expert_fits(result: dict, m: dict) -> list[str]:
    out = [f"fits of expert time vs (memory, tokens), memory capped at {m['saturation_gb']:g} GB:"]
    for report in result["fit"].reports:
        mark = "  <- stored" if report.family == result["profiles"].expert.curve.family else ""
        params = ", ".join(f"{k} {v:.4g}" for k, v in report.parameters.items())
        out.append(f"  {report.family:<12} RMSE {report.rmse_s * 1e3:.4f} ms, mean relative error "
                   f"{report.relative_error:.1%}, residual std error {report.residual_standard_error_s * 1e3:.4f} ms"
                   f"  [{params}]{mark}")
    return out


def _report(profiles, family: str):
    return next(r for r in profiles.reports if r.family == family)


def _scatter_gather(result: dict, m: dict) -> list[str]:
    profiles = result["profiles"]
    sg = profiles.scatter_gather
    out = [f"scatter-gather (round trip - compute_s, median, at memory >= {m['saturation_gb']:g} GB):"]
    for t, seconds in m["transport_overhead_s"].items():
        out.append(f"  {int(t):4d} tokens {2 * int(t) * profiles.shape.activation_bytes:8d} B  {_ms(seconds)} ms")
    out.append(f"  fit: {sg.intercept * 1e3:.3f} ms + bytes / {sg.bandwidth / 1e6:.1f} MB/s "
               f"(RMSE {_report(profiles, 'scatter_gather').rmse_s * 1e3:.4f} ms)")
    return out


def _cold_starts(result: dict, m: dict) -> list[str]:
    cs = result["profiles"].cold_start
    out = [f"cold start ({m['functions']['spawn']}, SpawnFunction -> InstanceReady; stages are medians):"]
    for n in sorted({c["experts"] for c in result["cold"]}):
        runs = [c for c in result["cold"] if c["experts"] == n]
        stages = ", ".join(f"{k} {statistics.median(c['stages'][k] for c in runs) * 1e3:.1f}"
                           for k in runs[0]["stages"])
        out.append(f"  {n:3d} experts {runs[0]['bytes']:10d} B  median {statistics.median(c['seconds'] for c in runs) * 1e3:7.1f} ms"
                   f"  ({stages} ms)")
    bandwidth = "inf" if math.isinf(cs.bandwidth) else f"{cs.bandwidth / 1e6:.1f}"
    out.append(f"  fit: {cs.intercept * 1e3:.1f} ms + bytes / {bandwidth} MB/s "
               f"(RMSE {_report(result['profiles'], 'cold_start').rmse_s * 1e3:.2f} ms)")
    b = result.get("burst")
    if b:
        out.append(f"  burst of {b['functions']} at once on {b['nodes']} nodes of {'+'.join(f'{c:g}' for c in b['cpus'])} CPUs: INIT mean "
                   f"{b['init_mean_s']['measured'] * 1e3:.0f} ms (alone {b['init_alone_s'] * 1e3:.0f} ms), "
                   f"last ready {b['last_ready_s']['measured']:.2f} s; spawn-path weight {b['spawn_shares']:g} "
                   f"models {b['init_mean_s']['modelled'] * 1e3:.0f} ms and {b['last_ready_s']['modelled']:.2f} s")
        if not b["explained"]:
            out.append(f"  (no spawn-path weight models this burst's INIT within 25%: the best, "
                       f"{b['fitted_spawn_shares']:g}, is off by more; the built-in {b['spawn_shares']:g} is kept)")
    return out


def _periods(periods: list[dict]) -> list[str]:
    if not periods:
        return []
    p0 = periods[0]
    out = [f"CFS period: back-to-back {p0['tokens']}-token calls at {p0['cpu_share']:.0%} of a vCPU "
           f"for {p0['round_trip_s']['n'] / max(p0['calls_per_s'], 1e-9):.1f} s (ms):",
           "  period     calls/s   median      p90      p99      max     mean   throttled        cgroup"]
    for p in periods:
        rt, th = p["round_trip_s"], p["throttling"]
        applied = p["cgroups"]["values"]
        quota = (f"quota {applied['cpu_quota_us']} us / {applied['cpu_period_us']} us"
                 if "cpu_quota_us" in applied else "NOT ENFORCED")
        throttled = (f"{th['throttled_periods']}/{th['periods']} periods, {th['throttled_s'] * 1e3:.0f} ms"
                     if th else "-")
        out.append(f"  {p['period_us'] / 1000:5g} ms {p['calls_per_s']:10.0f} {_ms(rt['median'])} "
                   f"{_ms(rt['p90'])} {_ms(rt['p99'])} {_ms(rt['max'])} {_ms(rt['mean'])}   {throttled:<16} {quota}")
    return out
