"""`moemesh bench`: the mesh measured against its baselines, all in one run on this machine.

    moemesh bench [--out bench-out] [--prompts 8] [--new-tokens 24]
    moemesh bench --http       instead: the HTTP front end against the SDK (mesh/bench_http.py)

1. decode: TPOT of the mesh (all-remote: every expert a function) against the in-process engine
   on the same prompts and batch (continuous batching in both).
2. scatter-gather: the mean round time per MoE layer against a raw ZeroMQ round trip of the same
   bytes, split into the same number of calls to the same number of echo processes.
3. cold start: time to ready of a function forked from the zygote against a fresh process.

Prints ratios against the baselines measured in the same run, writes `bench.json` and PNG
plots to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import zmq

from mesh.client import MeshClient
from mesh.config import load_config
from mesh.launcher import Mesh
from mesh.main_job import job_prompts
from mesh.sockets import harden


def _progress(step: int, total: int, what: str) -> None:
    bar = "#" * int(30 * step / total)
    print(f"\r[{bar:<30}] {step}/{total} {what:<48}", end="" if step < total else "\n", file=sys.stderr, flush=True)


EXTRA: dict[str, object] = {}  # --set overrides, applied to every mesh this run starts


def _config(spawn: str, policy: str = "all-remote"):
    return load_config(None, {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": policy, "functions.spawn": spawn, "functions.keep_alive_s": 120.0, **EXTRA,
    })


async def _mesh_decode(address: str, prompts: list[str], new_tokens: int) -> dict:
    async with MeshClient(address, timeout_s=120) as client:
        async def one(p):
            gen = client.generate(p, max_new_tokens=new_tokens, stop_at_eos=False)
            tokens = [t.token_id async for t in gen]
            return tokens, gen.done
        warm = await one(prompts[0])  # cold starts happen here, not in the measurement
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
        status = await client.status()
    return {"wall_s": wall, "tokens": [r[0] for r in results], "tpot_s": [r[1].tpot_s for r in results],
            "ttft_s": [r[1].ttft_s for r in results], "warmup_ttft_s": warm[1].ttft_s, "status": status}


def _in_process_decode(prompts: list[str], new_tokens: int) -> dict:
    import torch

    from mesh.config import resolve_model_path
    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.tokenizer import Tokenizer

    torch.set_num_threads(1)  # as the coordinator runs (coordinator.threads)
    path = resolve_model_path(str(EXTRA.get("model.path", "bundled")))
    dtype = getattr(torch, str(EXTRA.get("model.dtype", "float32")))
    model, tok = Checkpoint(path, dtype=dtype).load_model(), Tokenizer.from_dir(path)
    ids = [tok.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    Engine(model).complete(ids[:1], params)  # warm-up
    engine = Engine(model)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    start = time.perf_counter()
    out: list[list[int]] = [[] for _ in ids]
    for i, token in engine.generate(ids, params):
        now = time.perf_counter()
        first.setdefault(i, now)
        last[i] = now
        out[i].append(token)
    wall = time.perf_counter() - start
    tpot = [(last[i] - first[i]) / max(1, len(out[i]) - 1) for i in range(len(ids))]
    return {"wall_s": wall, "tokens": out, "tpot_s": tpot}


def raw_round_trip(peers: int, calls: int, nbytes: int, rounds: int = 300) -> float:
    """Mean seconds for `calls` messages totalling `nbytes`, spread over `peers` echo processes."""
    from mesh.echo import echo

    q = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=echo, args=(q,), daemon=True) for _ in range(peers)]
    for p in procs:
        p.start()
    endpoints = [q.get(timeout=120) for _ in procs]
    ctx = zmq.Context()
    socks = []
    for ep in endpoints:
        s = ctx.socket(zmq.DEALER)
        harden(s, "data", connect=ep)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    payload = b"\0" * max(1, nbytes // max(1, calls))
    times = []
    for r in range(rounds + 20):
        start = time.perf_counter()
        for c in range(calls):
            socks[c % peers].send_multipart([b"\x40", b"h" * 40, payload], copy=False)
        got = 0
        while got < calls:
            for s, _ in poller.poll(5000):
                while True:
                    try:
                        s.recv_multipart(zmq.NOBLOCK)
                        got += 1
                    except zmq.Again:
                        break
        if r >= 20:
            times.append(time.perf_counter() - start)
    for s in socks:
        s.send_multipart([b"stop"])
        s.close(linger=100)
    for p in procs:
        p.join(5)
    ctx.term()
    return statistics.mean(times)


def _cold_start(spawn: str, repeats: int = 3) -> dict:
    """One function (static split, one expert), cold-started `repeats` times: each time the
    request finds it scaled to zero after its 1 s keep-alive."""
    config = load_config(None, {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": "static-split", "policy.remote": [[0, 0]], "functions.spawn": spawn,
        **EXTRA, "functions.keep_alive_s": 1.0,
    })
    with Mesh(config, quiet=True) as mesh:
        endpoints = mesh.start(180)

        async def run():
            async with MeshClient(endpoints["client"], timeout_s=180) as client:
                for _ in range(repeats):
                    await client.generate("def f(x):", max_new_tokens=2).text()
                    while True:  # wait for the scale-to-zero the meter reports
                        status = await client.status()
                        if all(i["state"] in ("stopped", "failed") for i in status["instances"]):
                            break
                        await asyncio.sleep(0.2)
                return status

        status = asyncio.run(run())
    cold = status["cold_starts"]
    totals = [c["total_s"] for c in cold]
    # medians: the very first zygote start also waits for the zygote's own warm-up (torch import)
    stages = {k: statistics.median(c["stages"][k] for c in cold) for k in cold[0]["stages"]}
    return {"instances": len(totals), "mean_s": statistics.mean(totals), "median_s": statistics.median(totals),
            "stages_median_s": stages}


def _plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    layers = sorted(result["scatter_gather"]["per_layer"], key=int)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [result["scatter_gather"]["per_layer"][k]["mesh_round_ms"] for k in layers], 0.4,
           label="mesh scatter-gather round")
    ax.bar([x + 0.2 for x in xs], [result["scatter_gather"]["per_layer"][k]["raw_zmq_ms"] for k in layers], 0.4,
           label="raw ZeroMQ, same bytes and calls")
    ax.set_xticks(list(xs), [f"L{k}" for k in layers])
    ax.set_ylabel("ms per round")
    ax.set_title("scatter-gather per MoE layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scatter_gather.png", dpi=110)
    files.append("scatter_gather.png")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    d = result["decode"]
    a1.bar(["in-process", "mesh"], [d["in_process_tpot_ms"], d["mesh_tpot_ms"]], color=["#888", "#37a"])
    a1.set_ylabel("TPOT, ms (median)")
    a1.set_title("decode")
    c = result["cold_start"]
    stages = list(c["zygote"]["stages_median_s"])
    bottom = [0.0, 0.0]
    for st in stages:
        vals = [c["zygote"]["stages_median_s"][st], c["fresh"]["stages_median_s"][st]]
        a2.bar(["zygote", "fresh"], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a2.set_ylabel("seconds to ready (median)")
    a2.set_title("cold start")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode_cold_start.png", dpi=110)
    files.append("decode_cold_start.png")
    return files


POLICIES = ("all-local", "mix", "all-remote", "static-split", "remoe", "moeless", "bayesian", "moemesh")


def policy_replay(prompts: list[str], new_tokens: int, reference: list[list[int]], out: Path,
                  traces: str | None = None, policies: tuple[str, ...] = POLICIES) -> dict:
    """Every policy on the same prompt replay: tokens against the in-process engine, billed GB-s
    (invocation mode: what the functions actually worked) and latency, the planner's estimate
    beside the meter's. Prompts run one after another so plans adapt from request to request.
    static-split serves the upper half of every layer's experts remotely."""
    from mesh.config import resolve_model_path
    from nodes.model.config import MoEConfig

    model = MoEConfig.from_file(resolve_model_path(str(EXTRA.get("model.path", "bundled"))))
    half = model.num_experts // 2
    remote = [[layer, e] for layer in range(model.num_moe_layers) for e in range(half, model.num_experts)]
    rows = {}
    for i, policy in enumerate(policies):
        _progress(i, len(policies), f"policy {policy}")
        overrides = {"coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
                     "policy.name": policy, "policy.replan_every": 1, "billing.mode": "invocation",
                     "policy.remote": remote}
        if traces:
            overrides["predictor.traces"] = traces
        overrides.update(EXTRA)
        with Mesh(load_config(None, overrides), quiet=True) as mesh:
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
        rows[policy] = {
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
        }
    _progress(len(policies), len(policies), "done")
    base = rows["all-local"]["cost"] if "all-local" in rows else None
    for row in rows.values():
        row["cost_vs_all_local"] = row["cost"] / base if base else None
    return rows


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--preset", metavar="NAME[:LAYERS]",
                    help="run on a realistic-size synthetic checkpoint (moemesh synth; generated on first "
                         "use, cached in checkpoints/), in bfloat16, e.g. qwen1.5-moe-a2.7b:4")
    ap.add_argument("--http", action="store_true",
                    help="instead: TTFT and TPOT through the HTTP front end against the SDK, same prompts (http.json)")
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
    total = 5
    if args.http:
        from mesh.bench_http import http_vs_sdk

        result = http_vs_sdk(_config("zygote"), prompts, args.new_tokens, args.out)
        return 0 if result["text_identical"] else 1
    if args.policies:
        local = _in_process_decode(prompts, args.new_tokens)
        chosen = tuple(p for p in args.only.split(",") if p)
        rows = policy_replay(prompts, args.new_tokens, local["tokens"], args.out, args.traces, chosen)
        (args.out / "policies.json").write_text(json.dumps(rows, indent=1))
        print(f"{'policy':<13}{'tokens':>8}{'GB-s':>10}{'est GB-s':>10}{'est/meter':>10}{'experts':>10}"
              f"{'cost/all-local':>16}{'fns':>5}{'calls':>7}{'TTFT p50':>10}{'TPOT p50':>10}{'est TPOT':>10}"
              f"{'SLO met':>9}")

        def num(v, fmt):
            return format(v, fmt) if v is not None else "n/a"

        for name, r in rows.items():
            print(f"{name:<13}{'same' if r['tokens_identical'] else 'DIFFER':>8}{r['gb_s']:>10.3f}"
                  f"{num(r['estimate_gb_s'], '.3f'):>10}{num(r['estimate_vs_meter_gb_s'], '.2f'):>10}"
                  f"{r['gb_s_experts']:>10.3f}{num(r['cost_vs_all_local'], '.2f'):>16}{r['functions']:>5}{r['remote_calls']:>7}"
                  f"{r['ttft_p50_s']:>9.3f}s{r['tpot_p50_s']:>9.3f}s{num(r['estimate_tpot_p50_s'], '.3f'):>9}s"
                  f"{r['slo_met']:>9.0%}")
        print(f"wrote {args.out / 'policies.json'}")
        return 0 if all(r["tokens_identical"] for r in rows.values()) else 1

    _progress(0, total, "in-process engine")
    local = _in_process_decode(prompts, args.new_tokens)
    _progress(1, total, "mesh (all-remote, zygote): decode")
    with Mesh(_config("zygote"), quiet=True) as mesh:
        endpoints = mesh.start(180)
        remote = asyncio.run(_mesh_decode(endpoints["client"], prompts, args.new_tokens))
    rounds = remote["status"]["rounds"]
    _progress(2, total, "raw ZeroMQ round trips")
    per_layer = {}
    for layer, r in rounds.items():
        calls = max(1, round(r["calls_per_round"]))
        raw = raw_round_trip(peers=min(calls, 8), calls=calls, nbytes=int(r["bytes_per_round"]))
        per_layer[layer] = {"mesh_round_ms": r["mean_round_s"] * 1e3, "raw_zmq_ms": raw * 1e3,
                            "calls_per_round": r["calls_per_round"], "bytes_per_round": r["bytes_per_round"],
                            "ratio": r["mean_round_s"] / raw}
    _progress(3, total, "cold starts: zygote")
    zygote = _cold_start("zygote")
    _progress(4, total, "cold starts: fresh process")
    fresh = _cold_start("fresh")
    _progress(5, total, "done")

    mesh_tpot = statistics.median(remote["tpot_s"])
    local_tpot = statistics.median(local["tpot_s"])
    result = {
        "machine": {"cpus": mp.cpu_count()}, "prompts": len(prompts), "new_tokens": args.new_tokens,
        "tokens_identical": remote["tokens"] == local["tokens"],
        "decode": {"mesh_tpot_ms": mesh_tpot * 1e3, "in_process_tpot_ms": local_tpot * 1e3,
                   "ratio": mesh_tpot / local_tpot, "mesh_wall_s": remote["wall_s"], "in_process_wall_s": local["wall_s"]},
        "scatter_gather": {"per_layer": per_layer,
                           "mean_ratio": statistics.mean(v["ratio"] for v in per_layer.values()) if per_layer else None},
        "cold_start": {"zygote": zygote, "fresh": fresh, "ratio_fresh_over_zygote": fresh["median_s"] / zygote["median_s"]},
    }
    result["plots"] = _plots(result, args.out)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    print(f"tokens identical (mesh vs in-process): {result['tokens_identical']}")
    print(f"decode TPOT: mesh {mesh_tpot * 1e3:.1f} ms vs in-process {local_tpot * 1e3:.1f} ms  "
          f"-> {result['decode']['ratio']:.2f}x")
    for layer, v in per_layer.items():
        print(f"scatter-gather L{layer}: {v['mesh_round_ms']:.2f} ms vs raw ZeroMQ {v['raw_zmq_ms']:.2f} ms "
              f"({v['calls_per_round']:.1f} calls, {v['bytes_per_round'] / 1024:.1f} KiB) -> {v['ratio']:.2f}x")
    print(f"cold start (median): zygote {zygote['median_s'] * 1e3:.0f} ms vs fresh process {fresh['median_s'] * 1e3:.0f} ms "
          f"-> fresh is {result['cold_start']['ratio_fresh_over_zygote']:.1f}x slower")
    print(f"wrote {args.out / 'bench.json'} and {', '.join(result['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
