"""`moemesh profile`: measure expert functions on this host and store the allocator's profiles.

    moemesh profile [--model bundled] [--memory 0.125,0.25,0.5,1,2] [--tokens 1,4,16,64] [--calls 50]
                    [--period-us 10000 --period-us-compare 100000] [--out profiles/] [--host NAME]

Real function instances: a real node daemon (`python -m nodes.daemon`, its zygote, its cgroups)
is started under the coordinator's own control-plane pieces (mesh/control.py: the control
ROUTER, RegisterAck, SpawnFunction), and the expert calls go straight to each worker's data
socket, made as the executor makes its own. The pieces are in mesh/profiling/ (measure, fit,
report, run); this module is the command.

1. Latency vs memory: one function per memory size (CPU share = memory_gb / gb_per_vcpu, a CFS
   quota per `--period-us`) serving one expert; `--calls` back-to-back calls of each token
   count, the counts interleaved, in --rounds rounds that each visit every size (a burst of
   other work on the host then hits a few rounds of every size, not all of one). Per point:
   round trip and the worker's compute_s (median, p90, mean). The fitted quantity is the
   *expert time*: the median over rounds of the round's mean round trip, minus the transport
   overhead of that call size (below), i.e. all the time that depends on the function's size.
   Means, not medians, within a round: the CPU quota shows up as stalls (a throttled worker
   waits for the next CFS period), which a median of short calls never sees, and the allocator
   wants expected seconds; the cgroup's own throttling counters are reported beside them.
   Remoe's `a*exp(-b*y)+c` and the hyperbola `a + b/y` are both fitted (allocator.profiles,
   memory capped at --saturation-gb, default threads_per_function x gb_per_vcpu: a worker
   computes on that many threads); the one with the smaller residual standard error is stored
   unless --family picks one.
2. Scatter-gather: round trip minus compute_s (median) at the sizes at or above saturation
   (never throttled) against the bytes of a call (activations sent + received): a linear fit.
3. Cold start: functions holding 1, 2, 4, 16 experts (--cold-experts) spawned --cold-repeats times;
   seconds from SpawnFunction to InstanceReady against the weight bytes the worker read, plus
   the worker's own stage times (spawn, limits, weights, ready): a linear fit. Then a burst of
   --cold-burst one-expert functions requested at once, spread over the config's CPU nodes (a
   daemon each, as the mesh runs them): each daemon forks its own one after another and every
   INIT shares the cores; the spawn path's CPU weight in allocator.coldstart is fitted
   so that the modelled INIT summed over the burst is the measured one (what the meter bills).
4. CFS period: the same small call (--period-tokens) at --period-memory (0.25 GB = 25 % of a
   vCPU) for --period-seconds of back-to-back calls, under --period-us and under
   --period-us-compare (a second daemon): median, p90, p99, max.

Writes `<out>/<host>/<model>.json` (allocator.profiles.Profiles JSON, plus a "measurement"
section with every point; `Profiles.from_json` reads it), `<model>-fits.png` (both fits against
the measured points) and `<model>-period.png` next to it; prints the tables. Where cgroups are
not writable it still runs, with the CPU share unenforced, and says so in the output and the
JSON ("cgroups": {"enforced": false, ...}). `mesh.planning.profiles_of` loads the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from allocator.profiles import FAMILIES
from mesh.errors import MeshError
from mesh.profiling.report import render
from mesh.profiling.run import run_profile
from mesh.profiling.settings import Settings

__all__ = ["Settings", "main", "render", "run_profile"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moemesh profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    ap.add_argument("--model", default=None,
                    help="model directory (HF layout) or 'bundled' (default: the config's [model] path)")
    ap.add_argument("--memory", default=",".join(f"{v:g}" for v in d.memory), help="function sizes, GB")
    ap.add_argument("--tokens", default=",".join(map(str, d.tokens)), help="tokens per call")
    ap.add_argument("--calls", type=int, default=d.calls, help="calls per (memory, tokens) point")
    ap.add_argument("--rounds", type=int, default=d.rounds,
                    help="the calls are made in this many rounds over all sizes; the fit takes the median of round means")
    ap.add_argument("--period-us", type=int, default=None,
                    help="CFS period of the sweep (default: [functions] cfs_period_us)")
    ap.add_argument("--period-us-compare", type=int, default=d.period_us_compare,
                    help="the CFS period to compare with (0: no comparison)")
    ap.add_argument("--period-memory", type=float, default=d.period_memory, help="GB of the period comparison's function")
    ap.add_argument("--period-tokens", type=int, default=d.period_tokens, help="tokens per call in the period comparison")
    ap.add_argument("--period-seconds", type=float, default=d.period_seconds, help="seconds of calls per period")
    ap.add_argument("--cold-experts", default=",".join(map(str, d.cold_experts)), help="experts per cold-started function")
    ap.add_argument("--cold-repeats", type=int, default=d.cold_repeats)
    ap.add_argument("--cold-memory", type=float, default=d.cold_memory, help="GB of the cold-started functions")
    ap.add_argument("--cold-burst", type=int, default=d.cold_burst,
                    help="one-expert functions cold-started at once to fit the spawn-path weight (0: keep 3)")
    ap.add_argument("--burst-memory", type=float, default=d.burst_memory, help="GB of each function of the burst")
    ap.add_argument("--saturation-gb", type=float, default=None,
                    help="memory beyond which a function is no faster (default threads_per_function x gb_per_vcpu)")
    ap.add_argument("--family", default=d.family, choices=("best", *FAMILIES), help="the fit to store")
    ap.add_argument("--out", type=Path, default=d.out, help="profiles folder: writes <out>/<host>/<model>.json")
    ap.add_argument("--host", default="", help="host name to store the profile under (default: this machine's)")
    ap.add_argument("--config", default=None, help="launch.toml for [functions] and [model] (default: built-in defaults)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    settings = Settings(
        model=args.model, memory=tuple(_floats(args.memory)), tokens=tuple(_ints(args.tokens)), calls=args.calls,
        rounds=args.rounds,
        period_us=args.period_us, period_us_compare=args.period_us_compare, period_memory=args.period_memory,
        period_tokens=args.period_tokens, period_seconds=args.period_seconds,
        cold_experts=tuple(_ints(args.cold_experts)), cold_repeats=args.cold_repeats, cold_memory=args.cold_memory,
        cold_burst=args.cold_burst, burst_memory=args.burst_memory, saturation_gb=args.saturation_gb, family=args.family, out=args.out, host=args.host, config=args.config,
        quiet=args.quiet,
    )
    try:
        result = run_profile(settings)
    except MeshError as exc:
        print(f"moemesh profile: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
