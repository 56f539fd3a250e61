"""The data-plane half of `moemesh bench`: the mesh against its floors, all measured in one run.

1. decode: TPOT of the mesh (all-remote: every expert a function) against the in-process engine
   on the same prompts and batch (continuous batching in both).
2. scatter-gather: the mean round per MoE layer against its *floor*: a raw ZeroMQ round trip of
   the same bytes, split into the same number of calls to the same number of echo processes,
   plus the slowest worker's own expert compute in the round (timed inside the worker).
3. cold start: time to ready of a function forked from the zygote against a fresh process.
4. throughput: generated tokens/s at concurrency 1, 8 and 32, mesh against the in-process
   engine at the same concurrency (its batch = the concurrency).

With `--profile`, py-spy samples the coordinator during the decode measurement (the
collapsed stacks, and the top functions by inclusive and own time, land in --out): the
profile every figure's explanation in the README comes from.

Ratios are named fields of bench.json: decode.ratio, scatter_gather.per_layer[L].ratio_vs_floor
(and .ratio_vs_raw), scatter_gather.mean_ratio_vs_floor, cold_start.ratio_fresh_over_zygote,
throughput.levels[c].ratio_vs_in_process.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import zmq

from mesh.client import MeshClient
from mesh.config import MeshConfig, load_config, resolve_model_path
from mesh.launcher import Mesh
from mesh.sockets import harden

LEVELS = (1, 8, 32)  # concurrencies of the throughput measurement


def mesh_config(extra: dict, spawn: str = "zygote", policy: str = "all-remote") -> MeshConfig:
    return load_config(None, {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": policy, "functions.spawn": spawn, "functions.keep_alive_s": 120.0, **extra,
    })


async def _generate(client: MeshClient, prompt: str, new_tokens: int):
    gen = client.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
    tokens = [t.token_id async for t in gen]
    return tokens, gen.done


async def mesh_decode(address: str, prompts: list[str], new_tokens: int,
                      levels: tuple[int, ...] = ()) -> dict:
    """The prompts at once (TPOT, tokens), then each concurrency of `levels` (tokens/s)."""
    async with MeshClient(address, timeout_s=300) as client:
        warm = await _generate(client, prompts[0], new_tokens)  # cold starts happen here, not below
        start = time.perf_counter()
        results = await asyncio.gather(*(_generate(client, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - start
        status = await client.status()
        rates = {}
        for c in levels:
            start = time.perf_counter()
            done = await asyncio.gather(*(_generate(client, prompts[i % len(prompts)], new_tokens)
                                          for i in range(c)))
            rates[c] = sum(len(r[0]) for r in done) / (time.perf_counter() - start)
    return {"wall_s": wall, "tokens": [r[0] for r in results], "tpot_s": [r[1].tpot_s for r in results],
            "ttft_s": [r[1].ttft_s for r in results], "warmup_ttft_s": warm[1].ttft_s, "status": status,
            "tokens_per_s": rates}


def in_process_decode(prompts: list[str], new_tokens: int, extra: dict, levels: tuple[int, ...] = (),
                      one_at_a_time: bool = False) -> dict:
    """The in-process engine on one thread (as the coordinator runs), same prompts and batch;
    one_at_a_time: each prompt alone, as a replay that sends them one after another runs them
    (in bfloat16 the batch a row shares changes the kernels' blocking, and a near-tie of the
    logits can flip: 1 of 32 greedy tokens did on the Qwen shapes)."""
    import torch

    from nodes.model.checkpoint import Checkpoint
    from nodes.model.engine import Engine, SamplingParams
    from nodes.model.skew import apply_zipf
    from nodes.model.tokenizer import Tokenizer

    torch.set_num_threads(1)  # as the coordinator runs (coordinator.threads)
    path = resolve_model_path(str(extra.get("model.path", "bundled")))
    dtype = getattr(torch, str(extra.get("model.dtype", "float32")))
    model, tok = Checkpoint(path, dtype=dtype).load_model(), Tokenizer.from_dir(path)
    apply_zipf(model, extra.get("model.routing_zipf"))  # --set model.routing_zipf=S: the mesh's skew too
    ids = [tok.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    Engine(model).complete(ids[:1], params)  # warm-up
    engine = Engine(model)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    start = time.perf_counter()
    out: list[list[int]] = [[] for _ in ids]
    groups = [[i] for i in range(len(ids))] if one_at_a_time else [list(range(len(ids)))]
    for group in groups:
        for j, token in engine.generate([ids[i] for i in group], params):
            now = time.perf_counter()
            first.setdefault(group[j], now)
            last[group[j]] = now
            out[group[j]].append(token)
    wall = time.perf_counter() - start
    tpot = [(last[i] - first[i]) / max(1, len(out[i]) - 1) for i in range(len(ids))]
    rates = {}
    for c in levels:
        batch = [ids[i % len(ids)] for i in range(c)]
        start = time.perf_counter()
        done = Engine(model).complete(batch, params)
        rates[c] = sum(map(len, done)) / (time.perf_counter() - start)
    return {"wall_s": wall, "tokens": out, "tpot_s": tpot, "tokens_per_s": rates}


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


def cold_start(spawn: str, extra: dict, repeats: int = 3, log_dir: Path | None = None) -> dict:
    """One function (static split, one expert), cold-started `repeats` times: each time the
    request finds it scaled to zero after its 1 s keep-alive. Logs in log_dir (None: none)."""
    config = load_config(None, {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "policy.name": "static-split", "policy.remote": [[0, 0]], "functions.spawn": spawn,
        **extra, "functions.keep_alive_s": 1.0,
    })
    with Mesh(config, log_dir=log_dir, quiet=True) as mesh:
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
    # function instances only: experts loaded into the main function on demand are listed too
    cold = [c for c in status["cold_starts"] if c.get("instance_id") != "main"]
    totals = [c["total_s"] for c in cold]
    # medians: the very first zygote start also waits for the zygote's own warm-up (torch import)
    stages = {k: statistics.median(c["stages"][k] for c in cold) for k in cold[0]["stages"]}
    return {"instances": len(totals), "mean_s": statistics.mean(totals), "median_s": statistics.median(totals),
            "stages_median_s": stages}


def scatter_gather(rounds: dict[str, dict]) -> dict:
    """Per MoE layer: the mesh's mean round against the raw round trip and against the floor."""
    per_layer = {}
    for layer, r in rounds.items():
        calls = max(1, round(r["calls_per_round"]))
        raw = raw_round_trip(peers=min(calls, 8), calls=calls, nbytes=int(r["bytes_per_round"]))
        floor = raw + r["slowest_compute_s"]
        per_layer[layer] = {
            "mesh_round_ms": r["mean_round_s"] * 1e3, "raw_zmq_ms": raw * 1e3,
            "slowest_compute_ms": r["slowest_compute_s"] * 1e3, "floor_ms": floor * 1e3,
            "scatter_ms": r["scatter_s"] * 1e3, "summed_compute_ms": r["summed_compute_s"] * 1e3,
            "calls_per_round": r["calls_per_round"],
            "bytes_per_round": r["bytes_per_round"], "ratio_vs_raw": r["mean_round_s"] / raw,
            "ratio_vs_floor": r["mean_round_s"] / floor,
        }
    mean = statistics.mean if per_layer else (lambda _: None)
    return {"per_layer": per_layer,
            "mean_ratio_vs_floor": mean([v["ratio_vs_floor"] for v in per_layer.values()]),
            "mean_ratio_vs_raw": mean([v["ratio_vs_raw"] for v in per_layer.values()])}


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    sg = result["scatter_gather"]["per_layer"]
    layers = sorted(sg, key=int)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = list(range(len(layers)))
    ax.bar([x - 0.2 for x in xs], [sg[k]["mesh_round_ms"] for k in layers], 0.4, label="mesh scatter-gather round")
    ax.bar([x + 0.2 for x in xs], [sg[k]["raw_zmq_ms"] for k in layers], 0.4, label="raw ZeroMQ, same bytes and calls")
    ax.bar([x + 0.2 for x in xs], [sg[k]["slowest_compute_ms"] for k in layers], 0.4,
           bottom=[sg[k]["raw_zmq_ms"] for k in layers], label="+ slowest worker's compute (= floor)")
    ax.set_xticks(xs, [f"L{k}" for k in layers])
    ax.set_ylabel("ms per round")
    ax.set_title("scatter-gather per MoE layer against its floor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scatter_gather.png", dpi=110)
    files.append("scatter_gather.png")

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.5))
    d = result["decode"]
    a1.bar(["in-process", "mesh"], [d["in_process_tpot_ms"], d["mesh_tpot_ms"]], color=["#888", "#37a"])
    a1.set_ylabel("TPOT, ms (median)")
    a1.set_title("decode")
    c = result["cold_start"]
    bottom = [0.0, 0.0]
    for st in c["zygote"]["stages_median_s"]:
        vals = [c["zygote"]["stages_median_s"][st], c["fresh"]["stages_median_s"][st]]
        a2.bar(["zygote", "fresh"], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a2.set_ylabel("seconds to ready (median)")
    a2.set_title("cold start")
    a2.legend(fontsize=8)
    t = result["throughput"]["levels"]
    levels = sorted(t, key=int)
    a3.plot([int(k) for k in levels], [t[k]["mesh_tokens_per_s"] for k in levels], "o-", label="mesh")
    a3.plot([int(k) for k in levels], [t[k]["in_process_tokens_per_s"] for k in levels], "s--", label="in-process")
    a3.set_xscale("log", base=2)
    a3.set_xlabel("concurrent requests")
    a3.set_ylabel("tokens/s")
    a3.set_title("throughput")
    a3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode_cold_start.png", dpi=110)
    files.append("decode_cold_start.png")
    return files


def run(prompts: list[str], new_tokens: int, out: Path, extra: dict, progress, profile: bool = False,
        levels: tuple[int, ...] = LEVELS) -> dict:
    """The whole data-plane bench; writes nothing but plots (the caller writes bench.json)."""
    from mesh.bench_profile import Spy

    total = 5
    progress(0, total, "in-process engine")
    local = in_process_decode(prompts, new_tokens, extra, levels)
    progress(1, total, "mesh (all-remote, zygote): decode, throughput")
    spy = None
    with Mesh(mesh_config(extra), log_dir=out / "logs" / "all-remote", quiet=True) as mesh:
        endpoints = mesh.start(300)
        if profile:
            spy = Spy(mesh.coordinator.pid, out / "profile-coordinator.txt")
        with spy if spy else _nothing():
            remote = asyncio.run(mesh_decode(endpoints["client"], prompts, new_tokens, levels))
    progress(2, total, "raw ZeroMQ round trips")
    sg = scatter_gather(remote["status"]["rounds"])
    progress(3, total, "cold starts: zygote")
    zygote = cold_start("zygote", extra, log_dir=out / "logs" / "cold-zygote")
    progress(4, total, "cold starts: fresh process")
    fresh = cold_start("fresh", extra, log_dir=out / "logs" / "cold-fresh")
    progress(5, total, "done")

    mesh_tpot = statistics.median(remote["tpot_s"])
    local_tpot = statistics.median(local["tpot_s"])
    result = {
        "machine": {"cpus": mp.cpu_count()}, "model": str(extra.get("model.path", "bundled")),
        "dtype": str(extra.get("model.dtype", "float32")), "prompts": len(prompts), "new_tokens": new_tokens,
        "tokens_identical": remote["tokens"] == local["tokens"],
        "decode": {"mesh_tpot_ms": mesh_tpot * 1e3, "in_process_tpot_ms": local_tpot * 1e3,
                   "ratio": mesh_tpot / local_tpot, "mesh_wall_s": remote["wall_s"], "in_process_wall_s": local["wall_s"]},
        "scatter_gather": sg,
        "cold_start": {"zygote": zygote, "fresh": fresh, "ratio_fresh_over_zygote": fresh["median_s"] / zygote["median_s"]},
        "throughput": {"levels": {str(c): {
            "mesh_tokens_per_s": remote["tokens_per_s"][c], "in_process_tokens_per_s": local["tokens_per_s"][c],
            "ratio_vs_in_process": remote["tokens_per_s"][c] / local["tokens_per_s"][c],
            "ratio_vs_concurrency_1": remote["tokens_per_s"][c] / remote["tokens_per_s"][levels[0]]}
            for c in levels}},
        "data_plane": remote["status"].get("data_plane"),
    }
    if spy is not None:
        result["profile"] = spy.summary(out / "profile-coordinator.md")
    result["plots"] = plots(result, out)
    return result


def report(result: dict) -> str:
    """The lines `moemesh bench` prints."""
    d, sg, c = result["decode"], result["scatter_gather"], result["cold_start"]
    lines = [f"tokens identical (mesh vs in-process): {result['tokens_identical']}",
             f"decode TPOT: mesh {d['mesh_tpot_ms']:.1f} ms vs in-process {d['in_process_tpot_ms']:.1f} ms "
             f"-> {d['ratio']:.2f}x"]
    for layer, v in sg["per_layer"].items():
        lines.append(f"scatter-gather L{layer}: {v['mesh_round_ms']:.2f} ms vs floor {v['floor_ms']:.2f} ms "
                     f"(raw ZeroMQ {v['raw_zmq_ms']:.2f} + slowest compute {v['slowest_compute_ms']:.2f}; "
                     f"all workers' compute {v['summed_compute_ms']:.2f}; "
                     f"{v['calls_per_round']:.1f} calls, {v['bytes_per_round'] / 1024:.1f} KiB) "
                     f"-> {v['ratio_vs_floor']:.2f}x floor, {v['ratio_vs_raw']:.2f}x raw")
    lines.append(f"cold start (median): zygote {c['zygote']['median_s'] * 1e3:.0f} ms vs fresh process "
                 f"{c['fresh']['median_s'] * 1e3:.0f} ms -> fresh is {c['ratio_fresh_over_zygote']:.1f}x slower")
    def rate(v: float) -> str:  # a realistic-size model makes 1-2 tokens/s here
        return f"{v:.0f}" if v >= 10 else f"{v:.2f}"

    for level, t in result["throughput"]["levels"].items():
        lines.append(f"throughput at concurrency {level}: mesh {rate(t['mesh_tokens_per_s'])} tokens/s vs in-process "
                     f"{rate(t['in_process_tokens_per_s'])} -> {t['ratio_vs_in_process']:.2f}x "
                     f"({t['ratio_vs_concurrency_1']:.1f}x the mesh at concurrency 1)")
    if "profile" in result:
        lines.append(f"coordinator profile: {result['profile']['file']} (top functions in {result['profile']['table']})")
    return "\n".join(lines)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
