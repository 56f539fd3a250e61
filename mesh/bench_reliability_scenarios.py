"""The scenarios of `moemesh bench --reliability` (mesh/bench_reliability.py runs them).

Each takes a Run (the mesh, its client address, the prompts and their fault-free reference
continuations, the options) and returns its figures: a dict with a "targets" list of
{"name", "value", "target", "met"} rows. Every wait polls the mesh's status or waits on the
load's own events; the only fixed sleeps are a fault schedule's ("kill every 3 s").

    healthy         N requests at concurrency C: lost, duplicated, identical to the reference
    kill-worker     the same load, `kill -9` of a random warm worker every few seconds
    (sigstop and kill-daemon: mesh/bench_reliability_outages.py)
    scale-to-zero   trickle load over short keep-alives: a request, another as they expire, zero
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

from mesh.bench_reliability_load import CountingClient, Load, Outcome, run_load
from mesh.launcher import Mesh

DETECT_S = 3.0  # issue 12: a hung or dead worker / node detected within 3 s
RECOVER_S = 5.0  # throughput back to >= 80% of healthy within 5 s
RECOVER_SHARE = 0.8
ERROR_WITHIN_S = 10.0  # a request a fault broke gets a typed error within 10 s
AFFECTED_COMPLETE = 0.99
IN_FLIGHT_COMPLETE = 0.95  # of the requests in flight at a node's death, complete within ...
IN_FLIGHT_WITHIN_S = 15.0


@dataclass
class Run:
    mesh: Mesh
    address: str
    prompts: list[list[int]]  # distinct prompts (token ids)
    reference: list[list[int]]  # their fault-free greedy continuations
    opts: object  # the parsed command line (requests, concurrency, new_tokens, deadline_s, ...)
    rng: object  # random.Random(seed): which worker dies

    def jobs(self, n: int) -> list[tuple[int, list[int]]]:
        return [(i % len(self.prompts), self.prompts[i % len(self.prompts)]) for i in range(n)]

    def correct(self, o: Outcome) -> bool:
        return o.status == "done" and o.tokens == self.reference[o.job]

    def client(self) -> CountingClient:
        return CountingClient(self.address, timeout_s=self.opts.deadline_s + 30, connect_timeout_s=30)


def target(name: str, value, goal: str, met: bool) -> dict:
    return {"name": name, "value": value, "target": goal, "met": bool(met)}


def tally(run: Run, load: Load) -> dict:
    """The figures every scenario reports about its load."""
    out = load.outcomes
    done = [o for o in out if o.status == "done"]
    errors = [o for o in out if o.status == "error"]
    latencies = sorted(o.end - o.start for o in done if o.end is not None)
    return {
        "requests": len(out), "completed": len(done), "errors": len(errors), "lost": len(load.lost()),
        "duplicated": len(load.duplicated()), "mismatched": sum(1 for o in done if not run.correct(o)),
        "identical": sum(1 for o in out if run.correct(o)),
        "typed_errors": sum(1 for o in errors if o.typed), "untyped_errors": sum(1 for o in errors if not o.typed),
        "error_codes": dict(Counter(o.error_code or o.error_type or "?" for o in errors)),
        "wire_duplicate_tokens_dropped": sum(w.duplicate_tokens for w in load.wire.values()),
        "wall_s": load.end - load.start, "tokens_per_s": load.tokens_per_s(),
        "requests_per_s": len(done) / max(1e-9, load.end - load.start),
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
        "failures": [{"request_id": o.request_id, "status": o.status, "error_code": o.error_code,
                      "error": o.error, "tokens": len(o.tokens), "finish_reason": o.finish_reason}
                     for o in out if not run.correct(o)][:20],
    }


def planned_replicas(status: dict) -> dict[str, int]:
    plan = (status.get("policy") or {}).get("plan") or {}
    return {f["id"]: int(f.get("replicas") or 1) for f in plan.get("functions", [])}


def warm_instances(status: dict) -> list[dict]:
    return [i for i in status["instances"] if i["state"] == "warm" and i.get("pid")]


async def wait_warm(run: Run, client: CountingClient, timeout_s: float = 180.0) -> dict:
    """Until every planned function replica has a warm instance (the coordinator spawns missing
    ones when a request is admitted, so a short request is sent while some are missing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.status(30)
        wanted = planned_replicas(status)
        warm = Counter(i["function_id"] for i in warm_instances(status))
        if all(warm[f] >= n for f, n in wanted.items()):
            return status
        if time.monotonic() > deadline:
            missing = sorted(f for f, n in wanted.items() if warm[f] < n)
            raise TimeoutError(f"functions {missing[:8]} not warm within {timeout_s:.0f} s")
        await client.generate("", prompt_ids=run.prompts[0], max_new_tokens=2, stop_at_eos=False).text()
        await asyncio.sleep(0.25)  # polling the status while the spawns land


def death_of(status: dict, instance_ids: set[str]) -> list[dict]:
    return [d for d in status["deaths"] if d["instance_id"] in instance_ids]


# -- 1 ---------------------------------------------------------------------------------------------


async def healthy(run: Run) -> dict:
    async with run.client() as client:
        await wait_warm(run, client)
        load = await run_load(client, run.jobs(run.opts.requests), run.opts.concurrency, run.opts.new_tokens,
                              run.opts.deadline_s, "healthy")
    figures = tally(run, load)
    figures["targets"] = [
        target("lost", figures["lost"], "0", figures["lost"] == 0),
        target("duplicated", figures["duplicated"], "0", figures["duplicated"] == 0),
        target("outputs identical to the fault-free reference", f"{figures['identical']}/{figures['requests']}",
               "all", figures["identical"] == figures["requests"]),
    ]
    return figures


# -- 2 ---------------------------------------------------------------------------------------------


async def kill_worker(run: Run) -> dict:
    kills: list[dict] = []
    state: dict = {}
    flowing, finished = asyncio.Event(), asyncio.Event()
    opts = run.opts

    async def killer(client: CountingClient) -> None:
        await flowing.wait()
        while not finished.is_set() and (opts.kills is None or len(kills) < opts.kills):
            warm = warm_instances(await client.status(30))
            if warm:
                victim = run.rng.choice(sorted(warm, key=lambda i: i["instance_id"]))
                try:
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills.append({"time": time.time(), "instance_id": victim["instance_id"],
                                  "function_id": victim["function_id"], "node": victim["node"], "pid": victim["pid"]})
                    state["note"] = f"kill -9 #{len(kills)}: {victim['function_id']}"
                except ProcessLookupError:
                    pass  # it was gone already: the next one
            try:
                await asyncio.wait_for(finished.wait(), opts.kill_every_s)
            except TimeoutError:
                pass

    async with run.client() as client:
        await wait_warm(run, client)
        task = asyncio.create_task(killer(client))
        try:
            load = await run_load(client, run.jobs(opts.requests), opts.concurrency, opts.new_tokens, opts.deadline_s,
                                  "kill-worker", on_token=lambda _o: flowing.set(), state=state)
        finally:
            finished.set()
            flowing.set()
            await task
        status = await client.status(30)
    figures = tally(run, load)
    times = [k["time"] for k in kills]
    affected = [o for o in load.outcomes if any(o.in_flight_at(t) for t in times)]
    ok = [o for o in affected if run.correct(o)]
    rest = [o for o in affected if not run.correct(o)]
    late = []  # (errored request, seconds from the last kill before its error)
    for o in rest:
        if o.status == "error":
            before = [t for t in times if o.start <= t <= o.end]
            late.append((o, o.end - max(before) if before else None))
    delays = [d for _, d in late if d is not None]
    typed_in_time = [o for o, d in late if o.typed and d is not None and d <= ERROR_WITHIN_S]
    share = len(ok) / len(affected) if affected else 1.0
    deaths = death_of(status, {k["instance_id"] for k in kills})
    by_id = {k["instance_id"]: k["time"] for k in kills}
    detect = [d["time"] - by_id[d["instance_id"]] for d in deaths]
    figures.update(kills=len(kills), kill_every_s=opts.kill_every_s, affected=len(affected),
                   affected_completed_correct=len(ok), affected_share=share,
                   affected_errors=len([o for o in rest if o.status == "error"]),
                   error_delay_max_s=max(delays) if delays else None, hangs=figures["lost"],
                   # over the kills whose deaths the status still lists (its feed keeps the last 50)
                   detection_max_s=max(detect) if detect else None, deaths_seen=len(deaths), kill_log=kills)
    figures["targets"] = [
        target("affected requests complete with correct tokens", f"{share:.2%} of {len(affected)}",
               f">= {AFFECTED_COMPLETE:.0%}", share >= AFFECTED_COMPLETE),
        target("the rest get a typed error within 10 s", f"{len(typed_in_time)}/{len(rest)}",
               "all", len(typed_in_time) == len(rest)),
        target("hangs", figures["lost"], "0", figures["lost"] == 0),
        target("duplicated", figures["duplicated"], "0", figures["duplicated"] == 0),
    ]
    return figures


# -- 5 ---------------------------------------------------------------------------------------------


async def scale_to_zero(run: Run) -> dict:
    opts = run.opts
    keep = run.mesh.config.functions.keep_alive_s
    cycles, zero_waits = [], []
    outcomes: list[Outcome] = []
    state: dict = {}

    async def one(client: CountingClient, i: int) -> Outcome:
        load = await run_load(client, [run.jobs(i + 1)[i]], 1, opts.new_tokens, opts.deadline_s, "scale-to-zero",
                              state=state, quiet=True)
        return load.outcomes[0]

    async with run.client() as client:
        for cycle in range(opts.cycles):
            start = time.time()
            first = await one(client, 2 * cycle)
            # the second request races the scale-down: sent around the moment the keep-alive ends
            await asyncio.sleep(keep * run.rng.uniform(0.8, 1.2))
            second = await one(client, 2 * cycle + 1)
            outcomes += [first, second]
            zero_at = await _until_zero(client, keep + 60.0)
            zero_waits.append(None if zero_at is None else zero_at - (second.end or start))
            cycles.append({"cycle": cycle, "seconds": time.time() - start, "reached_zero": zero_at is not None,
                           "ok": [run.correct(first), run.correct(second)]})
            bad = sum(1 for o in outcomes if not run.correct(o))
            print(f"\r  scale-to-zero  cycle {cycle + 1:>3}/{opts.cycles}  requests {len(outcomes):>4}  failed {bad:>3}  "
                  f"zero reached {sum(c['reached_zero'] for c in cycles):>3}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    failed = [o for o in outcomes if not run.correct(o)]
    reached = sum(1 for c in cycles if c["reached_zero"])
    figures = {
        "cycles": len(cycles), "keep_alive_s": keep, "requests": len(outcomes), "failed": len(failed),
        "reached_zero": reached, "lost": sum(1 for o in outcomes if o.status == "lost"),
        "zero_after_s_median": statistics.median([z for z in zero_waits if z is not None]) if reached else None,
        "cycle_s_median": statistics.median([c["seconds"] for c in cycles]) if cycles else None,
        "failures": [{"request_id": o.request_id, "status": o.status, "error_code": o.error_code, "error": o.error,
                      "tokens": len(o.tokens)} for o in failed][:20],
    }
    figures["targets"] = [
        target("failed requests", f"{len(failed)} of {len(outcomes)}", "0", not failed),
        target("cycles that scaled to zero", f"{reached}/{len(cycles)}", "all", reached == len(cycles)),
    ]
    return figures


async def _until_zero(client: CountingClient, timeout_s: float) -> float | None:
    """When the status first shows no live function instance (None: not within timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await client.status(30)
        if not [i for i in status["instances"] if i["stopped_at"] is None]:
            return time.time()
        await asyncio.sleep(0.2)  # the status poll period
    return None
