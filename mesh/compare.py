"""`moemesh compare`: every chosen policy on the same workload file, each against a real mesh.

    moemesh workload azure --out w.jsonl --start-s 600 --duration-s 600 --time-scale 10 --keep-fraction 0.05
    moemesh compare --workload w.jsonl --policies all-local,mix,cpu-only,remoe,moemesh --out compare-out
    moemesh compare --quick                  # bundled model, 3 policies, 20 Poisson requests

For each policy (and each billing mode of ``--billing``, each keep-alive of ``--keep-alive``) a
fresh mesh starts (coordinator + node daemons as local processes, as ``moemesh bench`` starts
them), the workload is replayed open loop (request i is sent ``arrival_s`` after the start,
whatever happened to the others), and the meter is read: nothing here estimates. ``--warmup N``
sends N requests first and subtracts what they billed (steady state); by default cold starts
are part of the measurement, as in the papers' cold-start comparisons.

Measured per run: billed GB-s and money in the meter's billing mode (the meter computes the
mode it is configured for: ``--billing both`` runs each policy twice), the serverful price of
``cpu-cluster`` (``[billing] serverful_price_per_hour`` x the replay's wall time), TTFT and
TPOT p50/p95/p99, SLO attainment (a failed request counts as missed), throughput (generated
tokens / wall time), cold starts on the critical path and their latency, stragglers, tokens
against the in-process engine (greedy; ``--no-reference`` skips it), and billed cost over time
(status polled every ``--sample-s``).

Written to ``--out``: ``compare.json`` (rows, the exact config of every run, the workload's
header and summary, package versions, git revision, machine facts), ``compare.md`` (the
table and the same facts) and PNG plots: cost vs SLO attainment per policy, cost over time,
cold-start breakdown. Progress goes to stderr.

``--zipf own,0.5,1.0,1.5`` runs every policy once per routing skew (MoEless's Zipf-skewed
loads, nodes/model/skew.py; "own": the model's router), each against in-process tokens
under the same routing; the table's routing column names it.

Policies ``oracle`` (predictor ``oracle``, taught the workload's true activations traced in
process first) and ``eplb`` (predictor ``moving-average``: EPLB re-places from load history
every ``policy.replan_every`` requests) get their predictor set here; ``--set`` overrides any
key for every run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mesh import workload as wl

QUICK_POLICIES = ("all-local", "cpu-only", "moemesh")
PACKAGES = ("moemesh", "torch", "numpy", "scipy", "pyzmq", "msgpack", "tokenizers", "safetensors", "matplotlib")
STAGES = ("spawn", "limits", "weights", "ready")


def _progress(text: str) -> None:
    print(f"\r{text:<100}", end="", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- facts


def environment() -> dict:
    """Versions, git revision and machine facts, written beside every number."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu_model, mem_total = "", None
    try:
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        mem_total = round(mem_kb / 2**20, 2)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "git": {"revision": git("rev-parse", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())},
        "versions": versions, "python": platform.python_version(),
        "machine": {"nproc": usable, "cpu_count": os.cpu_count(), "memory_gib": mem_total, "cpu_model": cpu_model,
                    "platform": platform.platform()},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------- replay


@dataclass
class Outcome:
    """One request as the client saw it (the meter's verdict in ``record``)."""

    index: int
    sent_at: float
    done_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    tpot_s: float | None = None
    slo_met: bool = False
    cold_starts_on_path: int = 0
    error: str = ""


async def replay(address: str, workload: wl.Workload, *, timeout_s: float = 120.0, sample_s: float = 1.0,
                 label: str = "", warmup: int = 0) -> tuple[list[Outcome], list[dict], dict, dict | None, float]:
    """Send every request at its arrival offset; returns (outcomes, cost samples, final status,
    billing at the start of the replay, start time). ``warmup``: first send the first request
    that many times, one after another, outside the measurement (its billing is the returned
    starting billing, for the caller to subtract)."""
    from mesh.client import MeshClient

    samples: list[dict] = []
    outcomes: list[Outcome] = []
    async with MeshClient(address, timeout_s=timeout_s) as client:
        before = None
        for n in range(warmup):
            _progress(f"{label} warm-up {n + 1}/{warmup}")
            first = workload.requests[0]
            await client.generate(first.prompt, max_new_tokens=first.max_new_tokens, slo_class=first.slo_class,
                                  stop_at_eos=False).text()
        # what the mesh was billed before the replay (its start-up, any warm-up) is left out, so
        # that every policy's row is the same requests' bill
        before = (await client.status(timeout_s=30.0))["billing"]
        start = time.time()
        finished = 0

        async def one(i: int, req: wl.WorkloadRequest) -> None:
            nonlocal finished
            await asyncio.sleep(max(0.0, start + req.arrival_s - time.time()))
            out = Outcome(i, time.time())
            outcomes.append(out)
            try:
                gen = client.generate(req.prompt, max_new_tokens=req.max_new_tokens, slo_class=req.slo_class,
                                      stop_at_eos=False)
                out.tokens = [t.token_id async for t in gen]
                d = gen.done
                out.ttft_s, out.tpot_s = d.ttft_s, d.tpot_s
                out.slo_met = bool(d.record.get("slo", {}).get("met"))
                out.cold_starts_on_path = len(d.record.get("cold_starts_on_path") or [])
            except Exception as exc:  # a failed request is measured as failed, the replay goes on
                out.error = f"{type(exc).__name__}: {exc}"[:200]
            out.done_at = time.time()
            finished += 1

        async def sample() -> None:
            while True:
                try:
                    b = (await client.status())["billing"]
                    samples.append({"t_s": time.time() - start, "gb_s": b["gb_s"], "cost": b["cost"]})
                except Exception:  # a missed sample is a gap in the plot, not a failed run
                    pass
                _progress(f"{label} {finished}/{len(workload.requests)} requests, {time.time() - start:5.1f} s")
                await asyncio.sleep(sample_s)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(one(i, r) for i, r in enumerate(workload.requests)))
        finally:
            sampler.cancel()
        status = await client.status(timeout_s=30.0)
        samples.append({"t_s": time.time() - start, "gb_s": status["billing"]["gb_s"],
                        "cost": status["billing"]["cost"]})
    outcomes.sort(key=lambda o: o.index)
    return outcomes, samples, status, before, start


# ----------------------------------------------------------------------------- one run


def percentiles(values) -> dict:
    """p50/p95/p99 of the values (None when there are none)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(v, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99}


BILLED_KEYS = ("gb_s", "gb_s_main", "gb_s_experts", "cost", "invocations", "baseline_all_local_cost")


def summarise(policy: str, outcomes: list[Outcome], status: dict, samples: list[dict], *,
              reference: list[list[int]] | None = None, serverful_price_per_hour: float | None = None,
              before: dict | None = None) -> dict:
    """One row of the comparison from what the client saw and what the meter says.

    before: the meter's billing when the replay began (after a warm-up), subtracted; cold
    starts before the first request was sent are then left out too.
    """
    done = [o for o in outcomes if o.done_at is not None]
    start = min((o.sent_at for o in outcomes), default=0.0)
    wall = max((o.done_at for o in done), default=start) - start
    generated = sum(len(o.tokens) for o in outcomes)
    billing = dict(status["billing"])
    colds = status.get("cold_starts") or []
    if before is not None:
        for key in BILLED_KEYS:
            if billing.get(key) is not None and before.get(key) is not None:
                billing[key] -= before[key]
        colds = [c for c in colds if c.get("time", start) >= start]
    critical = [c for c in colds if c.get("critical_path")]
    names = list(dict.fromkeys([*STAGES, *(k for c in colds for k in c.get("stages", {}))]))
    stages = {s: float(np.mean([c.get("stages", {}).get(s, 0.0) for c in colds])) if colds else 0.0 for s in names}
    row = {
        "policy": policy, "billing_mode": billing["mode"], "requests": len(outcomes),
        "failed": sum(1 for o in outcomes if o.error), "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall, "generated_tokens": generated, "throughput_tok_s": generated / wall if wall > 0 else None,
        "gb_s": billing["gb_s"], "gb_s_main": billing["gb_s_main"], "gb_s_experts": billing["gb_s_experts"],
        "cost": billing["cost"], "invocations": billing["invocations"],
        "baseline_all_local_cost": billing.get("baseline_all_local_cost"),
        "ttft_s": percentiles(o.ttft_s for o in outcomes), "tpot_s": percentiles(o.tpot_s for o in outcomes),
        "slo_attainment": sum(o.slo_met for o in outcomes) / len(outcomes) if outcomes else None,
        "cold_starts": {"total": len(colds), "critical_path": len(critical),
                        "critical_latency_s": percentiles(c.get("total_s") for c in critical),
                        "requests_waiting_on_one": sum(1 for o in outcomes if o.cold_starts_on_path),
                        "mean_stage_s": stages, "listed_cap": 50},
        "stragglers": {"recent": len((status.get("stragglers") or {}).get("recent") or []),
                       "max_imbalance": max(((status.get("stragglers") or {}).get("imbalance") or {}).values(),
                                            default=None), "listed_cap": 50},
        "instances": len(status.get("instances") or []),
        "functions": len({i["function_id"] for i in status.get("instances") or []}),
        "main": status.get("main"),  # what the main function holds at the end, and is billed for
        "data_plane": status.get("data_plane"),  # calls, fallbacks, on-demand loads, cold-start waits
        "cost_over_time": samples,
    }
    if serverful_price_per_hour is not None:
        row["serverful_cost"] = serverful_price_per_hour * wall / 3600.0
        row["serverful_price_per_hour"] = serverful_price_per_hour
    if reference is not None:
        same = [o.tokens == ref for o, ref in zip(outcomes, reference, strict=True)]
        row["tokens_identical_share"] = sum(same) / len(same) if same else None
    return row


def run_config(policy: str, billing: str, keep_alive_s: float | str | None, extra: dict, traces: str | None):
    """The MeshConfig of one run: free ports, the policy, billing mode and keep-alive, node
    capacity large enough for one-function-per-expert layouts (memory is accounted, not
    reserved), the predictor oracle / eplb need; then ``extra`` (--set) over everything."""
    from mesh.config import load_config

    overrides: dict[str, object] = {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": policy, "billing.mode": billing,
        "nodes[0].capacity_gb": 256.0, "nodes[1].capacity_gb": 256.0,
    }
    if keep_alive_s == "histogram":  # adaptive: learned from each function's idle times
        overrides["functions.keep_alive_policy"] = "histogram"
    elif keep_alive_s is not None:
        overrides["functions.keep_alive_s"] = keep_alive_s
    if policy == "oracle":
        overrides.update({"predictor.name": "oracle", "predictor.traces": traces})
    elif policy == "eplb":
        overrides["predictor.name"] = "moving-average"
    overrides.update(extra)
    return load_config(None, overrides)


def run_one(config, workload: wl.Workload, *, label: str, reference=None, timeout_s: float = 120.0,
            sample_s: float = 1.0, warmup: int = 0, log_dir: Path | None = None) -> dict:
    """Start a mesh with ``config``, replay ``workload``, stop it; the row plus the run's config
    (the mesh's logs in ``log_dir``, if given)."""
    from mesh.launcher import Mesh

    policy = config.policy.name
    t0 = time.perf_counter()
    _progress(f"{label} starting the mesh")
    with Mesh(config, log_dir=log_dir, quiet=True) as mesh:
        endpoints = mesh.start(180)
        startup = time.perf_counter() - t0
        outcomes, samples, status, before, _ = asyncio.run(replay(
            endpoints["client"], workload, timeout_s=timeout_s, sample_s=sample_s, label=label, warmup=warmup))
    price = config.billing.serverful_price_per_hour if policy == "cpu-cluster" else None
    row = summarise(policy, outcomes, status, samples, reference=reference, serverful_price_per_hour=price,
                    before=before)
    if before is not None:
        row["cost_over_time"] = [{**p, "gb_s": p["gb_s"] - before["gb_s"], "cost": p["cost"] - before["cost"]}
                                 for p in row["cost_over_time"]]
    row.update({"keep_alive_s": config.functions.keep_alive_s, "keep_alive_policy": config.functions.keep_alive_policy,
                "mesh_startup_s": startup, "warmup": warmup,
                "plan": status.get("policy", {}).get("plan"), "config": config.to_dict(),
                "plan_record": {k: (status.get("policy") or {}).get(k) for k in ("name", "reason", "estimate")}
                | {"forecast_source": ((status.get("policy") or {}).get("forecast") or {}).get("source")}})
    return row


# ----------------------------------------------------------------------------- in-process helpers


def reference_tokens(workload: wl.Workload, model_path: str = "bundled", dtype: str = "float32",
                     routing_zipf: float | None = None) -> list[list[int]]:
    """Greedy tokens of every request from the in-process engine (batched, as the mesh batches),
    with the runs' [model] path, dtype and routing skew."""
    import torch

    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.skew import apply_zipf
    from nodes.model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    path = resolve_model_path(model_path)
    model, tok = Checkpoint(path, dtype=getattr(torch, dtype)).load_model(), Tokenizer.from_dir(path)
    apply_zipf(model, routing_zipf)
    engine = Engine(model)
    out: dict[int, list[int]] = {}
    for r in workload.requests:
        seq = engine.add(tok.encode(r.prompt), SamplingParams(max_new_tokens=r.max_new_tokens, stop_at_eos=False))
        out[seq.id] = []
    order = list(out)
    while engine.active:
        for seq, token in engine.step():
            out[seq.id].append(token)
    return [out[i] for i in order]


def trace_workload(workload: wl.Workload, store_dir: Path, model_path: str = "bundled", dtype: str = "float32",
                   routing_zipf: float | None = None) -> str:
    """The workload's true activations (in process, with the runs' [model] path, dtype and routing
    skew), as a trace store the oracle predictor learns."""
    import torch

    from mesh.config import resolve_model_path
    from mesh.trace import make_record, trace_meta, trace_one
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.skew import apply_zipf
    from nodes.model.tokenizer import Tokenizer
    from predictor.traces import TraceStore

    path = resolve_model_path(model_path)
    model, tok = Checkpoint(path, dtype=getattr(torch, dtype)).load_model(), Tokenizer.from_dir(path)
    apply_zipf(model, routing_zipf)
    store = TraceStore.create(store_dir, trace_meta(model, path.name))
    for i, r in enumerate(workload.requests):
        ids = tok.encode(r.prompt)
        t = trace_one(model, ids, r.max_new_tokens)
        store.append(make_record(model, f"w{i}", r.prompt, ids, r.max_new_tokens, t["prefill"], t["decode"],
                                 t["gate_inputs"], t["token_routing"]))
    return str(store_dir)


# ----------------------------------------------------------------------------- reports


def _fmt(value, spec: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The table and the facts beside it."""
    w, env = result["workload"], result["environment"]
    lines = [
        f"# moemesh compare: {len(result['rows'])} runs on `{w['file']}`", "",
        f"Workload: {w['header'].get('source')} ({json.dumps({k: v for k, v in w['header'].items() if k in ('window', 'time_scale', 'seed', 'rate_per_s', 'shape', 'keep_fraction', 'prompt_tokens', 'max_new_tokens')})}); "
        f"{w['summary']['requests']} requests over {w['summary']['span_s']:.1f} s.", "",
        "| policy | routing | billing | keep-alive s | $ cost | cost / all-local | GB-s | serverful $ | TTFT p50/p95/p99 s "
        "| TPOT p50/p95/p99 s | SLO met | tok/s | cold starts (critical path) | critical cold p50 s "
        "| stragglers | tokens = in-process | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = r.get("baseline_all_local_cost")
        ratio = r["cost"] / base if base else None
        t, p, c = r["ttft_s"], r["tpot_s"], r["cold_starts"]
        lines.append(
            f"| {r['policy']} | {_routing_label(r)} | {r['billing_mode']} | {_keep_label(r)} | {r['cost']:.3g} | {_fmt(ratio, '.2f')} "
            f"| {r['gb_s']:.3g} | {_fmt(r.get('serverful_cost'), '.3g')} "
            f"| {_fmt(t['p50'])} / {_fmt(t['p95'])} / {_fmt(t['p99'])} "
            f"| {_fmt(p['p50'])} / {_fmt(p['p95'])} / {_fmt(p['p99'])} | {_fmt(r['slo_attainment'], '.0%')} "
            f"| {_fmt(r['throughput_tok_s'], '.1f')} | {c['total']} ({c['critical_path']}) "
            f"| {_fmt(c['critical_latency_s']['p50'])} | {r['stragglers']['recent']} "
            f"| {_fmt(r.get('tokens_identical_share'), '.0%')} | {r['failed']} |")
    m = env["machine"]
    lines += [
        "", f"Command: `{result['command']}`; {result['elapsed_s']:.0f} s in all.",
        f"Machine: {m['nproc']} CPUs usable ({m['cpu_model']}), {m['memory_gib']} GiB; {m['platform']}.",
        f"Git {env['git']['revision'][:12]} ({env['git']['dirty_files']} files changed); Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".",
        "Cost is the meter's, in its billing mode; serverful $ is `[billing] serverful_price_per_hour` x wall time "
        "(cpu-cluster only). Cold starts and stragglers count the meter's last 50 listed. "
        "The exact config of every run is in compare.json.",
    ]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    skewed = len({r.get("routing_zipf") for r in rows}) > 1
    label = [f"{r['policy']} ({r['billing_mode'][:4]}, ka {_keep_label(r)}"
             + (f", {_routing_label(r)})" if skewed else ")") for r in rows]
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    costs = []
    for r, name in zip(rows, label):
        x = r["slo_attainment"] or 0.0
        ax.scatter(x, r["cost"], s=40)
        ax.annotate(name, (x, r["cost"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        costs.append(r["cost"])
        if r.get("serverful_cost") is not None:  # the always-on cluster's hourly price x wall time
            ax.scatter(x, r["serverful_cost"], s=40, marker="x", color="k")
            ax.annotate(f"{r['policy']} (serverful $/h)", (x, r["serverful_cost"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
            costs.append(r["serverful_cost"])
    if costs and min(costs) > 0 and max(costs) / min(costs) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("SLO attainment")
    ax.set_ylabel("billed cost, $ (meter; x: serverful price)")
    ax.set_title("cost vs SLO attainment")
    fig.tight_layout()
    fig.savefig(out / "cost_vs_slo.png", dpi=110)
    plt.close(fig)
    files.append("cost_vs_slo.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, name in zip(rows, label):
        pts = r["cost_over_time"]
        ax.plot([p["t_s"] for p in pts], [p["cost"] for p in pts], label=name)
    ax.set_xlabel("seconds since the replay began")
    ax.set_ylabel("billed cost so far, $")
    ax.set_title("cost over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost_over_time.png", dpi=110)
    plt.close(fig)
    files.append("cost_over_time.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = np.zeros(len(rows))
    xs = np.arange(len(rows))
    for stage in dict.fromkeys(k for r in rows for k in r["cold_starts"]["mean_stage_s"]):
        vals = np.array([r["cold_starts"]["mean_stage_s"].get(stage, 0.0) for r in rows])
        ax.bar(xs, vals, bottom=bottom, label=stage)
        bottom += vals
    for x, r, top in zip(xs, rows, bottom):
        c = r["cold_starts"]
        ax.annotate(f"{c['total']} ({c['critical_path']} crit.)", (x, top), ha="center", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs, label, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean seconds per cold start")
    ax.set_title("cold-start breakdown (count: all, on the critical path)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cold_starts.png", dpi=110)
    plt.close(fig)
    files.append("cold_starts.png")
    return files


# ----------------------------------------------------------------------------- main


def quick_workload(out: Path, requests: int = 20, rate_per_s: float = 2.0, seed: int = 0) -> Path:
    """The --quick workload: ``requests`` Poisson arrivals at ``rate_per_s``, 12 new tokens each."""
    pool = wl.PromptPool.bundled()
    return wl.save(wl.synthetic("poisson", pool, rate_per_s=rate_per_s, count=requests, seed=seed,
                                max_new_tokens=12, prompt_tokens=None), out / "workload.jsonl")


def _routing(skew: float | None) -> str:
    """A routing as tables and progress show it: "own" (the model's router) or "zipf S"."""
    return "own" if skew is None else f"zipf {skew:g}"


def _routing_label(row: dict) -> str:
    return _routing(row.get("routing_zipf"))


def _keep_label(row: dict) -> str:
    """A run's keep-alive as the tables show it: seconds, or "hist" (adaptive, fallback seconds)."""
    if row.get("keep_alive_policy") == "histogram":
        return f"hist ({row['keep_alive_s']:g})"
    return f"{row['keep_alive_s']:g}"


_CONFIG = object()  # --zipf not given: every run routes as [model] routing_zipf says


def _skews(text: str) -> list:
    """--zipf "own,0.5,1.5" -> [None, 0.5, 1.5] (None: the model's own router); "" -> [_CONFIG]."""
    out: list = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = None if part in ("own", "none", "model") else float(part)
        if value is not None and value < 0:
            raise ValueError(f"a Zipf skew is >= 0, got {part}")
        out.append(value)
    return out or [_CONFIG]


def _skew_inputs(extra: dict, workload: wl.Workload, policies: list[str], mode: str, no_reference: bool):
    """(in-process reference tokens, oracle traces) of one routing (``extra``'s [model])."""
    m = run_config("all-local", mode, None, extra, None).model
    reference = traces = None
    if not no_reference:
        _progress(f"in-process reference tokens (routing {_routing(m.routing_zipf)})")
        reference = reference_tokens(workload, m.path, m.dtype, m.routing_zipf)
    if "oracle" in policies:
        _progress("tracing the workload's true activations for the oracle")
        traces = trace_workload(workload, Path(tempfile.mkdtemp(prefix="moemesh-oracle-")) / "traces",
                                m.path, m.dtype, m.routing_zipf)
    return reference, traces


def _keep_alives(text: str) -> list[float | str | None]:
    """"config" | "none" | "fixed:30" | "30" | "histogram", comma-separated -> seconds (None = the
    config's; "histogram": the adaptive keep-alive learned from idle times)."""
    out: list[float | str | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "config":
            out.append(None)
        elif part == "none":
            out.append(0.0)
        elif part in ("histogram", "adaptive"):
            out.append("histogram")
        else:
            out.append(float(part.removeprefix("fixed:")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", type=Path, help="a workload file (moemesh workload); --quick makes one")
    ap.add_argument("--policies", help=f"comma-separated (default with --quick: {','.join(QUICK_POLICIES)})")
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    ap.add_argument("--billing", choices=("instance", "invocation", "both"), default="invocation",
                    help="the meter's billing mode; both = each policy run twice")
    ap.add_argument("--keep-alive", default="config",
                    help='keep-alive choices, comma-separated: "config", "none", "fixed:30", "histogram" '
                         '(adaptive, learned from idle times; fixed keep-alive until it has enough) (each its own run)')
    ap.add_argument("--quick", action="store_true", help="bundled model, 3 policies, 20 Poisson requests")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-process tokens to compare with")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per-token client timeout")
    ap.add_argument("--sample-s", type=float, default=1.0, help="seconds between cost samples")
    ap.add_argument("--warmup", type=int, default=0,
                    help="requests sent before the replay, outside the measurement (0: cold starts count)")
    ap.add_argument("--zipf", default="", metavar="S[,S...]",
                    help="run every policy under each Zipf routing skew s (MoEless sweeps 0.5 .. 1.5; 'own' = "
                         "the model's router), e.g. --zipf own,0.5,1.0,1.5; default: [model] routing_zipf")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--preset", metavar="NAME[:LAYERS]",
                    help="run on a realistic-size synthetic checkpoint in bf16 (moemesh synth; generated on "
                         "first use in checkpoints/), e.g. qwen1.5-moe-a2.7b:4")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a launch.toml key in every run, e.g. functions.cgroups=off")
    args = ap.parse_args(argv)
    from allocator import paper_baselines
    from mesh.config import KNOWN_POLICIES
    from mesh.launcher import parse_overrides

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workload is None:
        if not args.quick:
            ap.error("give --workload FILE (make one with `moemesh workload`) or --quick")
        args.workload = quick_workload(args.out)
    try:
        workload = wl.load(args.workload)
    except wl.WorkloadError as exc:
        print(f"moemesh compare: {exc}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in (args.policies or ",".join(QUICK_POLICIES)).split(",") if p.strip()]
    unknown = [p for p in policies if p not in KNOWN_POLICIES]
    if unknown:
        print(f"moemesh compare: unknown policies {unknown}; known: {', '.join(KNOWN_POLICIES)}", file=sys.stderr)
        return 2
    extra: dict[str, object] = {}
    if args.preset:
        from nodes.synth import ensure_checkpoint

        name, _, layers = args.preset.partition(":")
        extra = {"model.path": str(ensure_checkpoint(name, int(layers) if layers else None).resolve()),
                 "model.dtype": "bfloat16"}
    extra.update(parse_overrides(args.set))
    classes = {r.slo_class for r in workload.requests}
    if len(classes) == 1 and "slo.default_class" not in extra:
        # what a mesh plans before its first request (and sizes its start-up functions for) is
        # the class every request of this workload brings, as its operator would configure it
        extra["slo.default_class"] = classes.pop()
    modes = ["instance", "invocation"] if args.billing == "both" else [args.billing]
    keep_alives = _keep_alives(args.keep_alive)
    try:
        skews = _skews(args.zipf)
    except ValueError as exc:
        print(f"moemesh compare: --zipf: {exc}", file=sys.stderr)
        return 2
    runs = [(z, p, m, k) for z in skews for p in policies for m in modes for k in keep_alives]
    rows, skew_inputs = [], {}
    for n, (skew, policy, mode, keep_alive) in enumerate(runs, 1):
        at = dict(extra) if skew is _CONFIG else {**extra, "model.routing_zipf": skew}
        if skew not in skew_inputs:  # per routing: the in-process tokens and (oracle) true activations
            skew_inputs[skew] = _skew_inputs(at, workload, policies, modes[0], args.no_reference)
        reference, traces = skew_inputs[skew]
        label = f"[{n}/{len(runs)} {policy} {mode}{'' if skew is _CONFIG else ' ' + _routing(skew)}]"
        config = run_config(policy, mode, keep_alive, at, traces)
        try:
            row = run_one(config, workload, label=label, reference=reference, timeout_s=args.timeout_s,
                          sample_s=args.sample_s, warmup=args.warmup,
                          log_dir=args.out / "logs" / f"{n}-{policy}-{mode}")
        except Exception as exc:  # one policy that cannot run is a row saying so, not a lost comparison
            print(f"\n{label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"policy": policy, "billing_mode": mode, "error": f"{type(exc).__name__}: {exc}",
                         "config": config.to_dict()})
            continue
        row["paper"] = paper_baselines.PAPER_OF.get(policy, "moemesh" if policy == "moemesh" else "project")
        row["routing_zipf"] = config.model.routing_zipf  # None: the model's own router
        rows.append(row)
        _progress(f"{label} done: ${row['cost']:.3g}, SLO {_fmt(row['slo_attainment'], '.0%')}, "
                  f"{row['wall_s']:.1f} s")
        print(file=sys.stderr)
    good = [r for r in rows if "error" not in r]
    result = {
        "command": "moemesh compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": {"file": str(args.workload), "header": workload.header, "summary": workload.summary()},
        "environment": environment(), "rows": good, "failed_runs": [r for r in rows if "error" in r],
        "elapsed_s": time.perf_counter() - began,
    }
    result["plots"] = [] if args.no_plots or not good else plots(result, args.out)
    (args.out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    (args.out / "compare.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'compare.json'}, {args.out / 'compare.md'}"
          + (", " + ", ".join(result["plots"]) if result["plots"] else ""), file=sys.stderr)
    return 0 if good and not result["failed_runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
