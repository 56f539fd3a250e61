"""Scenarios 3 and 4 of `moemesh bench --reliability` (mesh/bench_reliability.py): a worker that
hangs and a node daemon that dies, each under a time-boxed load, with healthy windows first.

    sigstop         SIGSTOP of the busiest worker: when its death shows in the meter's record
                    (retired as hung, or killed by its daemon), and tokens/s in 1 s windows after it
    kill-daemon     `kill -9` of the busiest node daemon (mesh-up's supervision restarts it): when
                    its instances are retired, which in-flight requests complete within 15 s, when
                    the restarted daemon has registered again

Same contract as mesh/bench_reliability_scenarios.py: a Run in, figures with "targets" out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections import Counter

from mesh.bench_reliability_load import CountingClient, run_load, windows
from mesh.bench_reliability_scenarios import (
    DETECT_S,
    IN_FLIGHT_COMPLETE,
    IN_FLIGHT_WITHIN_S,
    RECOVER_S,
    RECOVER_SHARE,
    Run,
    death_of,
    tally,
    target,
    wait_warm,
    warm_instances,
)

# -- 3 ---------------------------------------------------------------------------------------------


async def sigstop(run: Run) -> dict:
    opts = run.opts
    state: dict = {}
    flowing, stop_sending = asyncio.Event(), asyncio.Event()
    info: dict = {}

    async def controller(client: CountingClient) -> None:
        await flowing.wait()
        info["flowing_at"] = time.time()
        await asyncio.sleep(opts.baseline_s)  # the fault's schedule: healthy windows first
        victim = max(warm_instances(await client.status(30)), key=lambda i: i["invocations"])
        info["victim"] = {k: victim[k] for k in ("instance_id", "function_id", "node", "pid")}
        info["stopped_at"] = time.time()
        os.kill(victim["pid"], signal.SIGSTOP)
        state["note"] = f"SIGSTOP {victim['function_id']}"
        end = info["stopped_at"] + opts.after_s
        while time.time() < end:
            if "death" not in info:
                deaths = death_of(await client.status(30), {victim["instance_id"]})
                if deaths:
                    info["death"] = deaths[0]
                    state["note"] = f"retired after {deaths[0]['time'] - info['stopped_at']:.2f} s"
            await asyncio.sleep(0.25)  # the status poll period
        stop_sending.set()

    async with run.client() as client:
        await wait_warm(run, client)
        try:
            load = await _under_fault(run, opts, client, controller, "sigstop", stop_sending, flowing, state)
        finally:
            pid = info.get("victim", {}).get("pid")
            if pid:
                _resume(pid)
        if "death" not in info and "victim" in info:
            info.update(death=next(iter(death_of(await client.status(30), {info["victim"]["instance_id"]})), None))
    figures = tally(run, load)
    stopped_at = info["stopped_at"]
    before = windows(load.outcomes, info["flowing_at"] + 1.0, stopped_at)  # the first second ramps up
    after = windows(load.outcomes, stopped_at, stopped_at + opts.after_s)
    healthy_tps = statistics.median(before) if before else 0.0
    recovered = next((k + 1.0 for k in range(len(after) - 1)
                      if min(after[k], after[k + 1]) >= RECOVER_SHARE * healthy_tps), None)
    death = info.get("death")
    detected = death["time"] - stopped_at if death else None
    figures.update(victim=info["victim"], death_reason=death["reason"] if death else None, detected_s=detected,
                   healthy_tokens_per_s=healthy_tps, windows_before=before, windows_after=after,
                   recovered_s=recovered)
    figures["targets"] = [
        target("detected (worker retired) after SIGSTOP", _s(detected), f"<= {DETECT_S:.0f} s",
               detected is not None and detected <= DETECT_S),
        target("throughput back to >= 80% of healthy (1 s windows)", _s(recovered), f"<= {RECOVER_S:.0f} s",
               recovered is not None and recovered <= RECOVER_S),
        target("lost", figures["lost"], "0", figures["lost"] == 0),
        target("completed with correct tokens", f"{figures['identical']}/{figures['requests']}", "all",
               figures["identical"] == figures["requests"]),
    ]
    return figures


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)  # the mesh killed it, or it is let go now
    except ProcessLookupError:
        pass


def _s(v) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


# -- 4 ---------------------------------------------------------------------------------------------


async def kill_daemon(run: Run) -> dict:
    opts = run.opts
    if len(run.mesh.config.nodes) < 2:
        return {"skipped": "needs two node daemons (the default launch.toml has cpu0 and cpu1)", "targets": []}
    state: dict = {}
    flowing, stop_sending = asyncio.Event(), asyncio.Event()
    info: dict = {}

    async def controller(client: CountingClient) -> None:
        await flowing.wait()
        await asyncio.sleep(opts.baseline_s)  # the fault's schedule
        status = await client.status(30)
        on = Counter(i["node"] for i in warm_instances(status))
        name = max(on, key=on.get)
        pid = run.mesh.daemons[name].pid
        info.update(node=name, pid=pid, instances={i["instance_id"] for i in warm_instances(status) if i["node"] == name})
        info["killed_at"] = time.time()
        os.kill(pid, signal.SIGKILL)
        state["note"] = f"kill -9 daemon {name}"
        hard_end = info["killed_at"] + 120.0
        while time.time() < hard_end:
            now = time.time()
            if "restarted_at" not in info and run.mesh.daemons[name].pid != pid:
                info["restarted_at"] = now
            node = next((n for n in (await client.status(30))["nodes"] if n["name"] == name), None)
            if node is not None and not node["alive"] and "seen_dead_at" not in info:
                info["seen_dead_at"] = now
                state["note"] = f"{name} marked dead"
            if node is not None and node["alive"] and node["pid"] not in (pid, 0) and "rejoined_at" not in info:
                info["rejoined_at"] = now
                state["note"] = f"{name} registered again"
            if now >= info["killed_at"] + IN_FLIGHT_WITHIN_S and "rejoined_at" in info:
                break
            await asyncio.sleep(0.1)  # the status poll period
        stop_sending.set()

    async with run.client() as client:
        await wait_warm(run, client)
        load = await _under_fault(run, opts, client, controller, "kill-daemon", stop_sending, flowing, state)
        status = await client.status(30)
    figures = tally(run, load)
    killed = info["killed_at"]
    deaths = death_of(status, info["instances"])
    detected = min(d["time"] for d in deaths) - killed if deaths else None
    in_flight = [o for o in load.outcomes if o.in_flight_at(killed)]
    in_time = [o for o in in_flight if run.correct(o) and o.end <= killed + IN_FLIGHT_WITHIN_S]
    share = len(in_time) / len(in_flight) if in_flight else 1.0

    def since(key: str):
        return info[key] - killed if key in info else None

    before = [o.end - o.start for o in load.outcomes if o.status == "done" and o.end <= killed]
    started = [o for o in in_flight if o.token_times and o.token_times[0] <= killed]  # in the batch, not queued
    figures.update(latency_before_kill_max_s=max(before) if before else None,
                   latency_before_kill_p50_s=statistics.median(before) if before else None,
                   in_flight_decoding=len(started), in_flight_queued=len(in_flight) - len(started),
                   in_flight_done_after_s=sorted(round(o.end - killed, 2) for o in in_flight if o.end is not None),
                   windows_before=windows(load.outcomes, killed - opts.baseline_s + 1.0, killed),
                   windows_after=windows(load.outcomes, killed, killed + IN_FLIGHT_WITHIN_S))
    figures.update(node=info["node"], detected_s=detected, marked_dead_seen_s=since("seen_dead_at"),
                   restarted_s=since("restarted_at"), registered_again_s=since("rejoined_at"),
                   registered_after_restart_s=(info["rejoined_at"] - info["restarted_at"]
                                               if "rejoined_at" in info and "restarted_at" in info else None),
                   in_flight=len(in_flight), in_flight_completed_15s=len(in_time), in_flight_share=share,
                   instances_lost=len(info["instances"]))
    figures["targets"] = [
        target("detected (its instances retired)", _s(detected), f"<= {DETECT_S:.0f} s",
               detected is not None and detected <= DETECT_S),
        target("in-flight requests complete within 15 s", f"{share:.2%} of {len(in_flight)}",
               f">= {IN_FLIGHT_COMPLETE:.0%}", share >= IN_FLIGHT_COMPLETE),
        target("daemon restarted and registered again", _s(since("rejoined_at")), "yes", "rejoined_at" in info),
        target("lost", figures["lost"], "0", figures["lost"] == 0),
    ]
    return figures


async def _under_fault(run, opts, client, controller, label: str, stop_sending: asyncio.Event,
                       flowing: asyncio.Event, state: dict):
    """The load at opts.concurrency until stop_sending, `controller(client)` injecting the fault
    beside it; both ended (and the controller awaited) however the load ends."""
    task = asyncio.create_task(controller(client))
    try:
        return await run_load(client, run.jobs(10 ** 6), opts.concurrency, opts.new_tokens, opts.deadline_s,
                              label, stop=stop_sending, on_token=lambda _o: flowing.set(), state=state)
    finally:
        flowing.set()
        stop_sending.set()
        await task
