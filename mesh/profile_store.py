"""Where measured profiles live: `profiles/<host>/<model>.json` (written by `moemesh profile`,
read by planning). Its own module so that planning and the profiler need not import each other."""

from __future__ import annotations

import socket
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "profiles"  # the checkout's profiles/


def default_host() -> str:
    """This machine's name for profiles/<host>/ ("local" when it has none)."""
    return socket.gethostname() or "local"


def profile_path(out: str | Path, host: str, model: str) -> Path:
    return Path(out) / host / f"{model}.json"


def stored_path(config) -> Path:
    """Where this host's profile of the configured model is (or would be) stored."""
    return profile_path(DEFAULT_OUT, default_host(), config.model.resolved_path().resolve().name)


def ensure_profiles(config) -> Path | None:
    """Measure this host's profile of the configured model if none is stored and
    `[policy] profiles = "auto"` (DESIGN.md: profiles are measured, never silently synthetic).

    Runs `moemesh profile` once (real function instances, a progress bar on stderr, about 20 s
    for the bundled model on 2 cores; the CFS-period comparison is skipped), cached under
    `profiles/<host>/<model>.json`; returns that path, or None where profiles are not "auto".
    """
    import logging
    import sys

    if config.policy.profiles != "auto":
        return None
    path = stored_path(config)
    sizes = sized_for(config)
    stale = stale_reason(path, smallest_gb=sizes["memory"][0])
    if stale is None:
        return path
    from mesh.profile import Settings, render, run_profile

    print(f"profiles: {stale}: measuring now, cached in {path} "
          "(set [policy] profiles = \"synthetic\" to skip)", file=sys.stderr, flush=True)
    result = run_profile(Settings(model=str(config.model.resolved_path()), period_us_compare=0,
                                  out=DEFAULT_OUT, host=default_host(), dtype=config.model.dtype, **sizes))
    logging.getLogger("moemesh.profile").info("%s", render(result))
    return path


def stale_reason(path: Path, smallest_gb: float | None = None) -> str | None:
    """Why the profile at `path` must be measured (again), or None: none is stored, it was
    measured before `moemesh profile` measured a burst of cold starts (its spawn-path weight
    would be the built-in 3, fitted on another day: allocator.coldstart) or before the nodes'
    init gate (its burst forked every cold start at once) or before INIT was split into the
    cgroup join and CPU work at the quota (Profiles.init_fixed_s) and keyed by the weights as
    served (a bf16 checkpoint served in float32 reads half of them), or its memory sweep
    starts above ``smallest_gb``, the smallest function plans may use (sized_for): calls of
    those would be extrapolated from the curve's fit (Bayesian sizes one-expert functions at
    0.125 GB)."""
    import json

    if not path.is_file():
        return "none measured for this host and model yet"
    try:
        data = json.loads(path.read_text())
        measurement = data.get("measurement") or {}
    except (OSError, ValueError, AttributeError):
        return f"{path} is unreadable"
    if "cold_burst" not in measurement:
        return f"{path} predates the cold-start burst measurement (spawn-path weight not fitted)"
    if not all("init_cpus" in n for n in measurement["cold_burst"].get("nodes") or [{}]):
        return f"{path} measured its burst of cold starts before nodes gated them (nodes/init_gate.py)"
    if "init_fixed_s" not in data or not all("cpu_share" in c for c in measurement.get("cold_starts") or [{}]):
        return (f"{path} fitted its cold starts with all of INIT bound by the CPU quota (no init_fixed_s) "
                f"and keyed by the bytes read, not served")
    swept = [float(p["memory_gb"]) for p in measurement.get("points") or () if "memory_gb" in p]
    if smallest_gb is not None and swept and min(swept) > smallest_gb + 1e-9:
        return (f"{path} sweeps functions from {min(swept):g} GB, above the smallest plans may use "
                f"({smallest_gb:g} GB, [functions] min_memory_gb)")
    return None


def sized_for(config) -> dict:
    """Profile settings whose functions can hold this model's experts: the memory sweep starts at
    the smallest 0.25 GB multiple that holds one expert (weights x 1.25 + 0.15 GB of runtime after
    the fork) and doubles three times, with `[functions] min_memory_gb` (0.125) before it where one
    expert fits there too (weights x 1.25 + 0.05 GB: a forked worker's own pages are 4-19 MB, so
    plans may size a one-expert function at the minimum); the burst's functions are of the 0.25
    GB multiple; cold starts use the expert counts that fit 4 GB. For the
    bundled model and Qwen-sized experts these are the defaults (0.125 .. 2 GB; 1, 2, 4, 16
    experts at 1 GB; a burst of 48 one-expert functions); a Mixtral-sized expert (336 MB in bf16; a burst of 11) sweeps 0.75 .. 6 GB, with fewer calls
    per point (a 64-row call of it takes seconds at 0.75 vCPU: 50 calls of each size would take
    half an hour; 8 take about two minutes in all)."""
    import math

    from mesh.planning import dtype_bytes
    from nodes.model.config import MoEConfig

    model = MoEConfig.from_file(config.model.resolved_path())
    expert_gb = 3 * model.hidden_size * model.expert_intermediate_size * dtype_bytes(config) / 2**30

    def holding(experts: int) -> float:
        return math.ceil((experts * expert_gb * 1.25 + 0.15) / 0.25) * 0.25

    base = max(0.25, holding(1))
    smallest = config.functions.min_memory_gb
    below = (smallest,) if smallest < base and expert_gb * 1.25 + 0.05 <= smallest else ()
    cold = tuple(n for n in (1, 2, 4, 16) if holding(n) <= 4.0) or (1,)
    calls = 50 if expert_gb < 0.05 else 8
    return {"memory": (*below, base, 2 * base, 4 * base, 8 * base), "period_memory": base, "burst_memory": base,
            "cold_experts": cold, "cold_memory": max(1.0, holding(max(cold))),
            "cold_burst": min(48, max(4, int(4.0 / expert_gb))),  # at most ~4 GB of weights at once
            "calls": calls, "rounds": min(10, calls // 2)}
