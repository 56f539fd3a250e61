"""`moemesh bench`: the mesh measured against its baselines, all in one run on this machine.

    moemesh bench [--out bench-out] [--prompts 8] [--new-tokens 24]
    moemesh bench --http       instead: the HTTP front end against the SDK (mesh/bench_http.py)
    moemesh bench --reliability  instead: the mesh under faults (mesh/bench_reliability.py; --help there)

    moemesh bench --policies   instead: every policy on the same prompts (tokens, GB-s, estimate)
    moemesh bench --quick      instead: `moemesh compare --quick` (the papers' comparison, small; CI runs it)

The default run is the data plane (mesh/bench_dataplane.py): decode TPOT against the in-process
engine, each MoE layer's scatter-gather round against its floor (raw ZeroMQ round trip of the
same bytes and calls + the slowest worker's own compute), cold start zygote against fresh, and
throughput at concurrency 1, 8, 32; `--profile` adds a py-spy profile of the coordinator.
`--preset NAME[:LAYERS]` runs any of them on a realistic-size checkpoint.

Prints ratios against the baselines measured in the same run, writes `bench.json` and PNG
plots to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from mesh.bench_dataplane import in_process_decode, mesh_config, report
from mesh.bench_dataplane import run as run_dataplane
from mesh.client import MeshClient
from mesh.config import load_config
from mesh.launcher import Mesh
from mesh.main_job import job_prompts


def _progress(step: int, total: int, what: str) -> None:
    bar = "#" * int(30 * step / total)
    print(f"\r[{bar:<30}] {step}/{total} {what:<48}", end="" if step < total else "\n", file=sys.stderr, flush=True)


EXTRA: dict[str, object] = {}  # --set overrides, applied to every mesh this run starts


def _config(spawn: str, policy: str = "all-remote"):
    return mesh_config(EXTRA, spawn, policy)


POLICIES = ("all-local", "mix", "all-remote", "static-split", "remoe", "moeless", "bayesian", "moemesh")


def policy_replay(prompts: list[str], new_tokens: int, reference: list[list[int]], out: Path,
                  traces: str | None = None, policies: tuple[str, ...] = POLICIES, repeats: int = 1) -> dict:
    """Every policy on the same prompt replay: tokens against the in-process engine, billed GB-s
    (invocation mode: what the functions actually worked) and latency, the planner's estimate
    beside the meter's. Prompts run one after another so plans adapt from request to request.
    static-split serves the upper half of every layer's experts remotely.

    With repeats > 1 the policies run round after round (each round every policy once, so slow
    spells of the host hit them alike); a policy's row is its median run by GB-s, with every
    run's figures under "runs" and the spread of its cost against all-local's median."""
    from mesh.config import resolve_model_path
    from nodes.model.config import MoEConfig

    model = MoEConfig.from_file(resolve_model_path(str(EXTRA.get("model.path", "bundled"))))
    half = model.num_experts // 2
    remote = [[layer, e] for layer in range(model.num_moe_layers) for e in range(half, model.num_experts)]
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    total = len(policies) * repeats
    for r in range(repeats):
        for i, policy in enumerate(policies):
            _progress(r * len(policies) + i, total, f"policy {policy}" + (f" (round {r + 1})" if repeats > 1 else ""))
            logs = out / "logs" / (policy if repeats == 1 else f"{policy}-{r + 1}")
            runs[policy].append(_replay_once(policy, prompts, new_tokens, reference, traces, remote, logs))
    _progress(total, total, "done")
    return summarise_runs(runs)


def summarise_runs(runs: dict[str, list[dict]]) -> dict:
    """policy -> its median run by GB-s (the lower middle of an even count), tokens identical
    only if every run's were, every run's figures under "runs", and its cost against the
    all-local row's (median and the runs' range)."""
    rows = {}
    for policy, seen in runs.items():
        ordered = sorted(seen, key=lambda row: row["gb_s"])
        rows[policy] = {**ordered[(len(ordered) - 1) // 2], "tokens_identical": all(x["tokens_identical"] for x in seen),
                        "runs": [{k: x[k] for k in RUN_FIGURES} for x in seen]}
    base = rows["all-local"]["cost"] if "all-local" in rows else None
    for row in rows.values():
        row["cost_vs_all_local"] = row["cost"] / base if base else None
        costs = [x["cost"] for x in row["runs"]]
        row["cost_vs_all_local_range"] = [min(costs) / base, max(costs) / base] if base else None
    return rows


RUN_FIGURES = ("gb_s", "cost", "estimate_gb_s", "ttft_p50_s", "tpot_p50_s", "functions", "fallbacks")


def _replay_once(policy: str, prompts: list[str], new_tokens: int, reference: list[list[int]],
                 traces: str | None, remote: list[list[int]], log_dir: Path) -> dict:
    """One mesh under `policy`, the prompts one after another: its row of the policy table (the
    mesh's logs in `log_dir`)."""
    from mesh.estimate_vs_meter import components

    overrides = {"coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
                 "policy.name": policy, "policy.replan_every": 1, "billing.mode": "invocation",
                 "policy.remote": remote}
    if traces:
        overrides["predictor.traces"] = traces
    overrides.update(EXTRA)
    with Mesh(load_config(None, overrides), log_dir=log_dir, quiet=True) as mesh:
        endpoints = mesh.start(180)

        async def run(address=endpoints["client"]):
            async with MeshClient(address, timeout_s=180) as client:
                results = []
                for p in prompts:
                    gen = client.generate(p, max_new_tokens=new_tokens, stop_at_eos=False)
                    results.append(([t.token_id async for t in gen], gen.done))
                return results, await client.status()

        results, status = asyncio.run(run())
    b = status["billing"]
    estimates = [r[1].record.get("estimate") for r in results]
    known = [e for e in estimates if e]
    est_gb_s = sum(e["billed_gb_s"] for e in known) if len(known) == len(estimates) else None
    est_tpot = statistics.median(e["tpot_s"] for e in known) if known else None
    return {
        "tokens_identical": [r[0] for r in results] == reference,
        "gb_s": b["gb_s"], "gb_s_experts": b["gb_s_experts"], "gb_s_main": b["gb_s_main"], "cost": b["cost"],
        "functions": len({x["function_id"] for x in status["instances"]}),
        "instances": len(status["instances"]), "remote_calls": status["engine"]["calls"],
        "fallbacks": status["engine"]["fallbacks"],
        "ttft_p50_s": statistics.median(r[1].ttft_s for r in results),
        "tpot_p50_s": statistics.median(r[1].tpot_s for r in results),
        "slo_met": sum(bool(r[1].record["slo"]["met"]) for r in results) / len(results),
        "estimate_gb_s": est_gb_s, "estimate_tpot_p50_s": est_tpot,
        "estimate_vs_meter_gb_s": est_gb_s / b["gb_s"] if est_gb_s and b["gb_s"] else None,
        "estimate_vs_meter_tpot": (est_tpot / statistics.median(r[1].tpot_s for r in results)
                                   if est_tpot else None),
        "data_plane": status.get("data_plane"), "main": status.get("main"),
        "calibrated": status.get("calibrated"),  # per-call and dense seconds the planner took from the run
        "components": components([r[1].record for r in results], status),  # est vs meter per term
        "requests": [{"ttft_s": r[1].ttft_s, "tpot_s": r[1].tpot_s, "estimate": r[1].record.get("estimate")}
                     for r in results],  # per request: what was measured beside what was estimated
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--reliability" in argv:  # a bench of its own, with its own options, --quick included (mesh/bench_reliability.py)
        from mesh.bench_reliability import main as reliability_main

        return reliability_main([a for a in argv if a != "--reliability"])
    if "--quick" in argv:  # the papers' comparison, small: bundled model, 3 policies, 20 Poisson requests
        from mesh.compare import main as compare_main

        return compare_main(argv)
    ap = argparse.ArgumentParser(prog="moemesh bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--prompts", type=int, default=8, help="concurrent requests in the decode benchmark")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--policies", action="store_true",
                    help="instead: replay the prompts under every policy and compare tokens, GB-s and latency")
    ap.add_argument("--traces", help="with --policies: a trace store the predictor learns from first")
    ap.add_argument("--only", default=",".join(POLICIES), metavar="POLICY,...",
                    help="with --policies: which policies (default: all eight)")
    ap.add_argument("--repeats", type=int, default=1, metavar="N",
                    help="with --policies: run every policy N times, round after round, and report each "
                         "policy's median run with the spread of its cost against all-local's (the host's "
                         "noise: the same plan bills differently from run to run)")
    ap.add_argument("--preset", metavar="NAME[:LAYERS]",
                    help="run on a realistic-size synthetic checkpoint (moemesh synth; generated on first "
                         "use, cached in checkpoints/), in bfloat16, e.g. qwen1.5-moe-a2.7b:4")
    ap.add_argument("--http", action="store_true",
                    help="instead: TTFT and TPOT through the HTTP front end against the SDK, same prompts (http.json)")
    ap.add_argument("--levels", default="1,8,32", metavar="C,...",
                    help="concurrencies of the throughput measurement (default 1,8,32; the first is the base)")
    ap.add_argument("--profile", action="store_true",
                    help="also sample the coordinator with py-spy during the decode measurement "
                         "(profile-coordinator.txt / .md in --out; needs `pip install py-spy`)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a launch.toml key in every mesh of the run, e.g. functions.cgroups=off")
    args = ap.parse_args(argv)
    from mesh.launcher import parse_overrides

    if args.preset:
        from nodes.synth import ensure_checkpoint

        name, _, layers = args.preset.partition(":")
        EXTRA.update({"model.path": str(ensure_checkpoint(name, int(layers) if layers else None).resolve()),
                      "model.dtype": "bfloat16"})
    EXTRA.update(parse_overrides(args.set))
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = job_prompts(args.prompts)
    if args.http:
        from mesh.bench_http import http_vs_sdk

        result = http_vs_sdk(_config("zygote"), prompts, args.new_tokens, args.out)
        return 0 if result["text_identical"] else 1
    if args.policies:
        local = in_process_decode(prompts, args.new_tokens, EXTRA, one_at_a_time=True)  # as the replay sends them
        chosen = tuple(p for p in args.only.split(",") if p)
        rows = policy_replay(prompts, args.new_tokens, local["tokens"], args.out, args.traces, chosen,
                             max(1, args.repeats))
        (args.out / "policies.json").write_text(json.dumps(rows, indent=1))
        print(f"{'policy':<13}{'tokens':>8}{'GB-s':>10}{'est GB-s':>10}{'est/meter':>10}{'experts':>10}"
              f"{'cost/all-local':>16}{'fns':>5}{'calls':>7}{'TTFT p50':>10}{'TPOT p50':>10}{'est TPOT':>10}"
              f"{'SLO met':>9}" + ("  cost/all-local range" if args.repeats > 1 else ""))

        def num(v, fmt):
            return format(v, fmt) if v is not None else "n/a"

        for name, r in rows.items():
            print(f"{name:<13}{'same' if r['tokens_identical'] else 'DIFFER':>8}{r['gb_s']:>10.3f}"
                  f"{num(r['estimate_gb_s'], '.3f'):>10}{num(r['estimate_vs_meter_gb_s'], '.2f'):>10}"
                  f"{r['gb_s_experts']:>10.3f}{num(r['cost_vs_all_local'], '.2f'):>16}{r['functions']:>5}{r['remote_calls']:>7}"
                  f"{r['ttft_p50_s']:>9.3f}s{r['tpot_p50_s']:>9.3f}s{num(r['estimate_tpot_p50_s'], '.3f'):>9}s"
                  f"{r['slo_met']:>9.0%}" + ("  {:.2f}-{:.2f}".format(*r["cost_vs_all_local_range"])
                                              if args.repeats > 1 and r["cost_vs_all_local_range"] else ""))
        print(f"wrote {args.out / 'policies.json'}")
        return 0 if all(r["tokens_identical"] for r in rows.values()) else 1

    levels = tuple(int(c) for c in args.levels.split(",") if c)
    result = run_dataplane(prompts, args.new_tokens, args.out, EXTRA, _progress, profile=args.profile, levels=levels)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"wrote {args.out / 'bench.json'} and {', '.join(result['plots'])}")
    return 0 if result["tokens_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
