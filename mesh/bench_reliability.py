"""`moemesh bench --reliability`: the mesh under faults, on the bundled model on loopback
(issue 12, "What it must show"), every figure against its target, written to JSON and Markdown.

    moemesh bench --reliability [--quick] [--requests 2000] [--concurrency 32] [--only NAME,...]
                                [--out bench-out/reliability] [--set KEY=VALUE ...]

Scenarios (mesh/bench_reliability_scenarios.py, _outages.py), each with a progress line and its figures:

1. healthy: N requests (default 2,000) at concurrency 32, 16 new tokens each, greedy: lost,
   duplicated, outputs identical to the in-process engine's (the fault-free reference), throughput.
2. kill-worker: the same load, `kill -9` of a random warm worker every --kill-every-s: the share
   of affected requests (in flight at a kill) that complete with correct tokens (>= 99%), a typed
   error within 10 s for the rest, 0 hangs.
3. sigstop: SIGSTOP of the busiest worker under load: time to detection (its death in the
   meter's record, reason "hung" or "died": the daemon's kill of a hung worker) <= 3 s;
   throughput in 1 s windows after it back to >= 80% of the healthy windows before it <= 5 s.
4. kill-daemon: `kill -9` of the busiest node daemon under load, with mesh-up's supervision
   running (Mesh.supervise_in_background, as `mesh-up` runs it): detection (its instances
   retired) <= 3 s, >= 95% of in-flight requests complete within 15 s, time until the
   restarted daemon has registered again.
5. scale-to-zero: --cycles cycles (default 100) over a short keep-alive (--keep-alive-s, on a
   mesh of its own with a few remote functions, static-split): a request, a second one as the
   keep-alive runs out (racing the scale-down), then wait until the status lists no live
   instance; 0 failed requests.

The mesh: the default launch.toml (two CPU node daemons) with policy all-remote, so that every
expert is a function a fault can hit (the default policy keeps every expert of the tiny bundled
model local: no worker to kill). Scenarios 1-4 share one mesh, in that order; each first waits
until every planned function is warm again. A request that has no outcome `--deadline-s` after
it was sent counts as lost (a hang). `--quick`: 200 requests, 2 s between kills, 10 cycles
(about 3 minutes on a busy 2-core host; the default run takes 15-30).
Writes DIR/reliability.json and DIR/reliability.md; exits 0 when every target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

from mesh.bench_reliability_outages import kill_daemon, sigstop
from mesh.bench_reliability_scenarios import Run, healthy, kill_worker, scale_to_zero
from mesh.config import load_config, resolve_model_path
from mesh.launcher import Mesh, parse_overrides

SCENARIOS = {"healthy": healthy, "kill-worker": kill_worker, "sigstop": sigstop, "kill-daemon": kill_daemon,
             "scale-to-zero": scale_to_zero}
ON_THE_SHARED_MESH = ("healthy", "kill-worker", "sigstop", "kill-daemon")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="moemesh bench --reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 requests, 10 cycles: a few minutes")
    ap.add_argument("--requests", type=int, help="requests of the healthy and kill-worker loads (default 2000)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--only", default=",".join(SCENARIOS), metavar="SCENARIO,...",
                    help=f"which scenarios (default all: {', '.join(SCENARIOS)})")
    ap.add_argument("--out", type=Path, default=Path("bench-out/reliability"))
    ap.add_argument("--kill-every-s", type=float, help="seconds between two kills (default 3, --quick 2)")
    ap.add_argument("--kills", type=int, help="at most this many kills (default: until the load ends)")
    ap.add_argument("--baseline-s", type=float, default=5.0, help="healthy seconds under load before a SIGSTOP / daemon kill")
    ap.add_argument("--after-s", type=float, default=12.0, help="seconds of load after the SIGSTOP")
    ap.add_argument("--cycles", type=int, help="scale-to-zero cycles (default 100, --quick 10)")
    ap.add_argument("--keep-alive-s", type=float, default=1.0, help="keep-alive of the scale-to-zero mesh")
    ap.add_argument("--deadline-s", type=float, default=60.0, help="a request with no outcome after this is lost")
    ap.add_argument("--distinct-prompts", type=int, default=64, help="distinct prompts, cycled through the load")
    ap.add_argument("--nodes", type=int, help="use only the first N [[nodes]] of the config")
    ap.add_argument("--seed", type=int, default=0, help="which workers die, when the second request of a cycle goes")
    ap.add_argument("--log-dir", type=Path, help="the mesh processes' logs (default OUT/logs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a launch.toml key in every mesh of the run, e.g. model.path=/my/model")
    args = ap.parse_args(argv)
    args.requests = args.requests or (200 if args.quick else 2000)
    args.kill_every_s = args.kill_every_s if args.kill_every_s is not None else (2.0 if args.quick else 3.0)
    args.cycles = args.cycles if args.cycles is not None else (10 if args.quick else 100)
    if args.quick:
        args.baseline_s, args.after_s = min(args.baseline_s, 4.0), min(args.after_s, 10.0)
    args.only = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)}")
    return args


def mesh_config(args, **more):
    """The default launch config, all-remote, free ports, and the run's --set overrides."""
    config = load_config(None, {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": "all-remote", "functions.keep_alive_s": 120.0, **parse_overrides(args.set), **more,
    })
    if args.nodes:
        config = config.__class__.from_dict({**config.to_dict(), "nodes": config.to_dict()["nodes"][:args.nodes]})
    return config


def prompts_and_reference(config, distinct: int, new_tokens: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Distinct prompts as token ids (the main job's prompt set when the model has a tokenizer,
    else seeded random ids) and their greedy continuations by the in-process engine: [distinct]."""
    import torch

    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams

    torch.set_num_threads(1)
    path = resolve_model_path(config.model.path)
    checkpoint = Checkpoint(path, dtype=getattr(torch, config.model.dtype))
    if (path / "tokenizer.json").exists():
        from mesh.main_job import job_prompts
        from nodes.model.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
        prompts = [tok.encode(p) for p in job_prompts(distinct)]
    else:
        rng = random.Random(seed)
        vocab = checkpoint.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(3, 12))] for _ in range(distinct)]
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    return prompts, Engine(checkpoint.load_model()).complete(prompts, params)


def scale_to_zero_config(args, num_layers: int, num_experts: int):
    """A mesh of its own: static-split with two remote experts per layer, the short keep-alive."""
    remote = [[layer, e] for layer in range(num_layers) for e in range(min(2, num_experts))]
    return mesh_config(args, **{"functions.keep_alive_s": args.keep_alive_s, "policy.name": "static-split",
                                "policy.remote": remote})


def run_scenarios(names: list[str], config, args, prompts, reference, log_dir: Path) -> dict:
    results: dict[str, dict] = {}
    rng = random.Random(args.seed)
    with Mesh(config, log_dir=log_dir / "shared", quiet=True) as mesh:
        mesh.start(240)
        mesh.supervise_in_background()  # as mesh-up does: a killed daemon is restarted
        run = Run(mesh, mesh.endpoints["client"], prompts, reference, args, rng)
        for name in names:
            results[name] = _one(name, run)
    return results


def _one(name: str, run: Run) -> dict:
    print(f"{name}:", file=sys.stderr, flush=True)
    start, load_before = time.time(), os.getloadavg()[0]
    try:
        figures = asyncio.run(SCENARIOS[name](run))
    except Exception as exc:  # a scenario that cannot finish is a finding; the others still run
        figures = {"error": f"{type(exc).__name__}: {exc}",
                   "targets": [{"name": "scenario ran to the end", "value": "no", "target": "yes", "met": False}]}
    figures["scenario_s"] = time.time() - start
    # the host's 1-minute load average before and after: the machine is shared, timings move with it
    figures["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    for t in figures["targets"]:
        print(f"  {t['name']}: {t['value']} (target {t['target']}) -> {'met' if t['met'] else 'MISSED'}",
              file=sys.stderr, flush=True)
    if "error" in figures:
        print(f"  error: {figures['error']}", file=sys.stderr)
    if "skipped" in figures:
        print(f"  skipped: {figures['skipped']}", file=sys.stderr)
    return figures


def markdown(result: dict) -> str:
    lines = ["# moemesh reliability bench", "",
             f"{result['model']}, policy {result['policy']}, {result['nodes']} node daemon(s), "
             f"{result['machine']['cpus']} CPUs; {result['options']['requests']} requests at concurrency "
             f"{result['options']['concurrency']}, {result['options']['new_tokens']} new tokens each, greedy.", "",
             "| scenario | figure | value | target | met |", "| --- | --- | --- | --- | --- |"]
    for name, figures in result["scenarios"].items():
        for t in figures["targets"]:
            lines.append(f"| {name} | {t['name']} | {t['value']} | {t['target']} | {'met' if t['met'] else '**missed**'} |")
        if "skipped" in figures:
            lines.append(f"| {name} | skipped | {figures['skipped']} | | |")
    healthy = result["scenarios"].get("healthy")
    if healthy and "tokens_per_s" in healthy:
        lines += ["", f"Healthy throughput: {healthy['tokens_per_s']:.0f} tokens/s, "
                      f"{healthy['requests_per_s']:.1f} requests/s, latency p50 {healthy['latency_p50_s']:.2f} s, "
                      f"p99 {healthy['latency_p99_s']:.2f} s."]
    lines += ["", "All figures: reliability.json (written by `moemesh bench --reliability`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.log_dir or args.out / "logs"
    config = mesh_config(args)
    print(f"reference: {args.distinct_prompts} prompts on the in-process engine", file=sys.stderr, flush=True)
    prompts, reference = prompts_and_reference(config, args.distinct_prompts, args.new_tokens, args.seed)
    results: dict[str, dict] = {}
    shared = [n for n in args.only if n in ON_THE_SHARED_MESH]
    if shared:
        results.update(run_scenarios(shared, config, args, prompts, reference, log_dir))
    if "scale-to-zero" in args.only:
        from nodes.model.config import MoEConfig

        model = MoEConfig.from_hf_dict(json.loads((resolve_model_path(config.model.path) / "config.json").read_text()))
        s2z = scale_to_zero_config(args, model.num_moe_layers, model.num_experts)
        with Mesh(s2z, log_dir=log_dir / "scale-to-zero", quiet=True) as mesh:
            mesh.start(240)
            results["scale-to-zero"] = _one("scale-to-zero", Run(mesh, mesh.endpoints["client"], prompts, reference,
                                                                 args, random.Random(args.seed)))
    result = {
        "machine": {"cpus": mp.cpu_count()}, "model": config.model.path, "policy": config.policy.name,
        "nodes": len(config.nodes),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "scenarios": {n: results[n] for n in args.only if n in results},
    }
    result["all_met"] = all(t["met"] for f in result["scenarios"].values() for t in f["targets"])
    (args.out / "reliability.json").write_text(json.dumps(result, indent=1))
    (args.out / "reliability.md").write_text(markdown(result))
    print(f"wrote {args.out / 'reliability.json'} and {args.out / 'reliability.md'}", file=sys.stderr)
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
