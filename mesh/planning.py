"""Planning glue: the coordinator's view of the allocator.

Turns the running model and launch.toml into the allocator's inputs (`ModelShape`, `Profiles`,
`Cluster`, `SLO`, `Workload`) and calls the configured policy. The maths lives in `allocator/`;
this module only translates, so a policy sees the same inputs in the coordinator, in
`moemesh plan` and in benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import allocator
from allocator.model import SLO, Cluster, MemoryGrid, ModelShape, Node, Prices, Workload
from allocator.plan import Plan
from allocator.profiles import Profiles
from mesh.config import MeshConfig
from nodes.model.config import MoEConfig
from predictor.forecast import Forecast

log = logging.getLogger("moemesh.planning")


def model_shape(config: MoEConfig, dtype_bytes: int = 4, name: str = "") -> ModelShape:
    """Byte counts of the model as the mesh holds it, at `dtype_bytes` per weight.

    main_bytes is counted from the very modules the main function allocates (built on the meta
    device: no memory), so the planner's main size and the tensors the coordinator holds agree
    exactly (DESIGN.md: what the planner assumes is what runs).
    """
    import torch

    from nodes.model.model import MoEModel

    with torch.device("meta"):
        main_params = MoEModel(config, experts=()).held_bytes() // 4  # meta tensors are float32
    hidden = config.hidden_size
    expert_params = 3 * hidden * config.expert_intermediate_size
    if config.attention == "mla":
        kv_per_token = config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    else:
        kv_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim
    return ModelShape(
        moe_layers=config.num_moe_layers, experts_per_layer=config.num_experts, top_k=config.top_k, hidden=hidden,
        bytes_per_expert=expert_params * dtype_bytes, main_bytes=main_params * dtype_bytes,
        kv_bytes_per_token=kv_per_token * dtype_bytes, activation_bytes=hidden * dtype_bytes,
        name=name or config.family,
    )


DEFAULT_WORKLOAD = Workload(prompt_tokens=64, new_tokens=32)  # a plan made without a request


def main_billed_gb(held_bytes: int, config: MeshConfig, profiles: Profiles,
                   workload: Workload = DEFAULT_WORKLOAD) -> float:
    """Main-function memory for `held_bytes` of weights: the same sum as the planner's
    (allocator.sizing.main_required_gb: weights + KV and activations of the workload + runtime),
    on the memory grid. The meter bills the main function at (at least) this size."""
    from allocator.sizing import BYTES_PER_GB

    shape = profiles.shape
    state = workload.total_tokens * (shape.kv_bytes_per_token + shape.activation_bytes)
    need = (held_bytes + state) / BYTES_PER_GB + profiles.runtime_gb
    cluster = cluster_of(config)
    return cluster.grid.round_up(need, maximum_gb=cluster.main.capacity_gb)


CALL_BOUND_FACTOR = 4.0  # a reply is waited for this many times its call's expected compute


def call_bounds(plan: Plan, profiles: Profiles, config: MeshConfig) -> dict[str, float]:
    """Seconds to wait for a reply from each of the plan's functions: CALL_BOUND_FACTOR x the
    expected compute of the biggest call the executor sends it (the payload cap's rows, or
    micro_batch_tokens), spread over its experts, at its CPU share. The expert profile's time at
    full speed (the memory of `threads_per_function` vCPUs) is scaled by 1 / CPU share below it:
    the fitted curves are only trusted inside the measured sizes (the exponential explodes below
    them). On the bundled model every bound is under policy.call_timeout_s; a Mixtral-sized
    expert (2.3 s for 64 rows on one core in bf16 here) computes a prefill call for tens of
    seconds at half a vCPU, which a 5 s timeout would give up on and recompute."""
    p, f = config.policy, config.functions
    rows = max(1, p.payload_cap_bytes // max(1, profiles.shape.activation_bytes))
    if p.micro_batch_tokens:
        rows = min(rows, p.micro_batch_tokens)
    full_gb = f.gb_per_vcpu * f.threads_per_function
    full_s = float(profiles.expert.curve(full_gb))  # one expert, one token, at full speed
    bounds = {}
    for spec in plan.functions:
        one = full_s * max(1.0, full_gb / spec.memory_gb)
        bounds[spec.id] = CALL_BOUND_FACTOR * one * (len(spec.experts) + profiles.expert.token_slope * rows)
    return bounds


def dtype_bytes(config: MeshConfig) -> int:
    """Bytes per weight of `[model] dtype`, as the coordinator and the functions hold them."""
    return {"float32": 4, "float16": 2, "bfloat16": 2}[config.model.dtype]


def cluster_of(config: MeshConfig) -> Cluster:
    nodes = [Node(n.name, n.kind, n.capacity_gb, max(1, int(round(n.cpus))),
                  init_cpus=config.functions.init_capacity(n.cpus)) for n in config.nodes]
    from mesh.device import price_kind, resolve_device

    main = Node("main", price_kind(resolve_device(config.coordinator.device)), 64.0, 2)
    f, b = config.functions, config.billing
    return Cluster(
        (main, *nodes), "main",
        grid=MemoryGrid(minimum_gb=f.min_memory_gb, step_gb=f.memory_step_gb, maximum_gb=f.max_memory_gb),
        prices=Prices(cpu_gb_s=b.price_cpu_gb_s, gpu_gb_s=b.price_gpu_gb_s,
                      per_request=b.price_per_million_requests / 1e6, gb_per_vcpu=f.gb_per_vcpu,
                      billing=b.mode, bill_init=b.bill_init, keep_alive_s=f.keep_alive_s,
                      round_s=b.round_ms / 1000.0),
        payload_limit_bytes=config.policy.payload_cap_bytes,
        # the coordinator is not CPU-capped: it computes on coordinator.threads threads
        main_speed_gb=config.coordinator.threads * f.gb_per_vcpu,
    )


def profiles_of(config: MeshConfig, model: MoEConfig, profiles_dir: str | Path | None = None) -> Profiles:
    """The profiles `moemesh profile` stored for (this host, this model), else synthetic ones.

    Looks for `<profiles_dir>/<host>/<model>.json` (profiles_dir: the checkout's profiles/ by
    default; host: this machine's hostname, then "local"; model: the model folder's name, e.g.
    "bundled"). The stored timings are used with this model's shape as the mesh holds it.
    Logs which profiles the allocator gets.
    """
    from mesh.profile_store import DEFAULT_OUT, default_host, profile_path

    shape = model_shape(model, dtype_bytes(config))
    if config.policy.profiles == "synthetic":
        log.info("profiles: synthetic, as [policy] profiles = \"synthetic\" asks")
        return Profiles.synthetic(shape, host="synthetic")
    name = config.model.resolved_path().resolve().name
    folder = Path(profiles_dir) if profiles_dir is not None else DEFAULT_OUT
    for host in dict.fromkeys((default_host(), "local")):
        path = profile_path(folder, host, name)
        if not path.is_file():
            continue
        try:
            stored = Profiles.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("profiles: synthetic, %s is unreadable (%s); run `moemesh profile` again", path, exc)
            return Profiles.synthetic(shape, host="local")
        if stored.shape.bytes_per_expert != shape.bytes_per_expert or stored.shape.hidden != shape.hidden:
            log.warning("profiles: %s was measured with experts of %d bytes (hidden %d), the mesh holds %d "
                        "(hidden %d); using it anyway; re-run `moemesh profile` for this model", path,
                        stored.shape.bytes_per_expert, stored.shape.hidden, shape.bytes_per_expert, shape.hidden)
        log.info("profiles: measured, from %s (expert curve %s)", path, stored.expert.curve.family)
        return dataclasses.replace(stored, shape=shape)
    missing = profile_path(folder, default_host(), name)
    if config.policy.profiles == "measured":
        from mesh.errors import MeshError

        raise MeshError(f"no measured profiles at {missing}", code="config_error",
                        hint="run `moemesh profile`, or set [policy] profiles = \"auto\" (measure on first use)")
    log.warning("profiles: SYNTHETIC, none measured at %s (mesh-up measures them on first use with "
                "[policy] profiles = \"auto\"; or run `moemesh profile`)", missing)
    return Profiles.synthetic(shape, host="synthetic")


def running_profiles(profiles: Profiles, model=None) -> Profiles:
    """Profiles as a running coordinator plans with them: its main function is already up, so no
    request pays the main cold start (it was paid, and is billed, from the coordinator's start);
    with `model` (measured profiles only), the non-expert work is timed on the model itself."""
    from allocator.profiles import LinearModel

    profiles = dataclasses.replace(profiles, main_cold_start=LinearModel(0.0, 0.0))
    if model is not None and profiles.host != "synthetic":
        profiles = dataclasses.replace(profiles, dense=measure_dense(model))
    return profiles


CALIBRATION_ROUNDS = 12  # remote rounds seen before the data plane's own timing replaces the profile's


def calibrated_profiles(profiles: Profiles, rounds: dict[str, dict],
                        dense_steps: Sequence[tuple[int, float]] = ()) -> Profiles:
    """`profiles` with the scatter-gather per-call time and the dense work the running mesh
    really takes.

    `moemesh profile` times one worker on a quiet host; the mesh's rounds also pay for waking
    many workers on shared cores (README: a round is 10-15x a raw round trip), and the planner
    that ignores it under-estimates TPOT, so the main function's billed busy time, by 2-3x
    (measured: a one-call round 3.3 ms against 1.1 ms estimated). rounds: the executor's
    `round_summary()` per layer (mean_round_s, calls_per_round, bytes_per_round sent,
    slowest_compute_s: the slowest reply's own compute). The per-call intercept becomes the
    mean round less that compute and the bytes' transfer time, weighted by rounds; below
    CALIBRATION_ROUNDS rounds the profile is kept.

    dense_steps: the engine loop's last steps, (rows fed, seconds per MoE layer outside the MoE
    rounds: attention, norms, gates, head, sampling, the engine's bookkeeping). The dense
    intercept becomes their median less the profile's per-token slope; below CALIBRATION_ROUNDS
    steps it is kept. The start-up timing (measure_dense) sees the model alone, on cores the
    zygotes share: 0.73-1.43 ms a layer from one start to the next, where a 48-function mesh's
    own steps spent more, and its main function was billed 25-30% over the estimate."""
    from allocator.profiles import LinearModel

    sg = profiles.scatter_gather
    total = weighted = 0.0
    for r in rounds.values():
        n, calls = float(r.get("rounds", 0)), float(r.get("calls_per_round", 0.0))
        if n <= 0 or calls <= 0:
            continue
        per_call_bytes = 2.0 * float(r.get("bytes_per_round", 0.0)) / calls
        rest = float(r["mean_round_s"]) - float(r.get("slowest_compute_s", 0.0)) - sg.slope * per_call_bytes
        weighted += n * max(0.0, rest)
        total += n
    out = profiles
    if total >= CALIBRATION_ROUNDS:
        out = dataclasses.replace(out, scatter_gather=LinearModel(weighted / total, sg.slope))
    if len(dense_steps) >= CALIBRATION_ROUNDS:
        slope = profiles.dense.slope
        intercept = float(np.median([seconds - slope * rows for rows, seconds in dense_steps]))
        out = dataclasses.replace(out, dense=LinearModel(max(0.0, intercept), slope))
    return out


class _NoExperts:
    """An ExpertExecutor that computes nothing: what is left of a forward is the dense work."""

    def run(self, block, plan):
        import torch

        return torch.zeros_like(plan.x)


DENSE_WARMUP = 2  # forwards not timed (first-call allocations)


def measure_dense(model, tokens: tuple[int, int] = (1, 64), repeats: int = 15):
    """The main function's non-expert seconds per MoE layer against tokens in a step, timed on
    this host with the model the coordinator runs (embeddings, attention, norms, gates, shared
    experts, dense layers, head; no routed expert): a line through the lower quartiles at two
    sizes. The coordinator times it at start-up, while the node daemons' zygotes import torch
    on the same cores: the median of 5 forwards ranged 0.72-1.66 ms per layer from one start to
    the next here (the same model; TPOT estimated 10 ms in one mesh and 13 in the next against
    11 measured in both); the lower quartile of 15, after two untimed, is the work itself."""
    import time

    import torch

    from allocator.profiles import LinearModel
    from nodes.model.cache import make_segments

    device = next(model.parameters()).device
    layers = max(1, model.config.num_moe_layers)
    quartiles = []
    for n in tokens:
        times = []
        for k in range(DENSE_WARMUP + repeats):
            ids = torch.zeros(n, dtype=torch.long, device=device)
            segments = make_segments([n], [model.new_cache()])
            start = time.perf_counter()
            model(ids, segments, _NoExperts(), all_logits=False)
            if k >= DENSE_WARMUP:
                times.append(time.perf_counter() - start)
        quartiles.append(sorted(times)[len(times) // 4] / layers)
    slope = max(0.0, (quartiles[1] - quartiles[0]) / (tokens[1] - tokens[0]))
    intercept = max(0.0, quartiles[0] - slope * tokens[0])
    log.info("profiles: dense work timed on the main model: %.3f ms + %.2f us/token per MoE layer",
             intercept * 1e3, slope * 1e6)
    return LinearModel(intercept, slope)


def slo_of(config: MeshConfig, slo_class: str | None = None) -> SLO:
    c = config.slo.classes[slo_class or config.slo.default_class]
    return SLO(c.ttft_s, c.tpot_s)


def expected_reuse(arrivals: Sequence[float], keep_alive_s: float, seen: int | None = None) -> float:
    """How many requests, this one included, the instances a plan starts now are expected to
    serve before they scale to zero: with arrivals at the recent rate r (requests per second
    over ``arrivals``, admission times in seconds, oldest first), an idle gap longer than the
    keep-alive K comes with chance exp(-r K) per request (Poisson), so an instance serves
    exp(r K) requests on average; at most ``seen``, the requests the stream has had so far (a
    stream is expected to last about as long again; None: len(arrivals)). 1 with fewer than two
    arrivals or no keep-alive: nothing to amortise over."""
    if keep_alive_s <= 0 or len(arrivals) < 2:
        return 1.0
    span = float(arrivals[-1]) - float(arrivals[0])
    if span <= 0:
        return 1.0
    cap = float(max(1, len(arrivals) if seen is None else seen))
    exponent = (len(arrivals) - 1) / span * keep_alive_s
    return cap if exponent >= math.log(cap) else max(1.0, math.exp(exponent))


def make_plan(config: MeshConfig, model: MoEConfig, forecast: Forecast | None = None,
              workload: Workload | None = None, warm=(), profiles: Profiles | None = None,
              reuse: float = 1.0, slo_class: str | None = None, in_force: Plan | None = None,
              main_held=None) -> Plan:
    """Run the configured policy (profiles: pass them to skip reading the stored ones again;
    reuse: the requests its cold starts are expected to serve, expected_reuse, which the
    `moemesh` policy spreads their INIT over; slo_class: the SLO class of the request planned
    for, None: [slo] default_class; in_force: the plan running now, which `moemesh` judges
    beside its fresh candidates, its ``warm`` instances costing no INIT; main_held: the experts
    the running main function holds, which `moemesh` candidates need not load)."""
    profiles = profiles or profiles_of(config, model)
    shape = profiles.shape
    workload = workload or DEFAULT_WORKLOAD
    if forecast is None:
        forecast = Forecast.uniform(shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k)
    options = {"warm": tuple(warm)}
    name = config.policy.name
    if name == "static-split":
        options["remote"] = [tuple(e) for e in config.policy.remote]
    if name in ("all-remote", "static-split"):
        if config.policy.function_memory_gb:
            options["memory_gb"] = config.policy.function_memory_gb
        options["replicas"] = config.policy.function_replicas
    from allocator import paper_baselines

    if name in paper_baselines.POLICIES:  # the papers' baselines (not in allocator.POLICIES)
        if name == "cpu-cluster":
            options["price_per_hour"] = config.billing.serverful_price_per_hour
        return paper_baselines.POLICIES[name](forecast, profiles, slo_of(config, slo_class), cluster_of(config), workload,
                                              **options)
    if name == "moemesh":
        options["reuse"] = max(1.0, float(reuse))
        options["in_force"] = in_force
        options["main_held"] = main_held
    return allocator.make_plan(name, forecast, profiles, slo_of(config, slo_class), cluster_of(config), workload,
                               **options)


def replan_skip_reason(estimate: dict | None, plan: Plan, profiles: Profiles, cluster: Cluster,
                       workload: Workload, slo: tuple[float, float], plan_s: float | None) -> str | None:
    """Why a due re-plan is not worth making for this request, or None to make it.

    The planner runs in the main function before the request's prefill, so its time is billed
    there and sits in the request's TTFT. A re-plan can save at most what the plan in force
    spends above the cheapest main function (one holding no expert) plus everything its
    functions bill; when the planner's estimate of that, for this request, is below what the
    last plan took to make (its seconds x the main's memory), planning would cost more than
    any plan could save. A request the plan in force would not serve within its SLO (ttft_s,
    tpot_s) is always re-planned for. Numbers from before any plan was timed re-plan.
    """
    if estimate is None or plan_s is None:
        return None
    ttft_s, tpot_s = slo
    if estimate["ttft_s"] > ttft_s or estimate["tpot_s"] > tpot_s:
        return None
    from allocator.sizing import main_memory_gb

    main_gb = plan.main.memory_gb
    floor_gb = min(main_gb, main_memory_gb(0, profiles, cluster, workload))
    headroom = estimate["main_gb_s"] * (1 - floor_gb / main_gb) + estimate["functions_gb_s"]
    cost = plan_s * main_gb
    if headroom >= cost:
        return None
    return (f"kept the plan in force: a re-plan could save at most {headroom:.3g} GB-s on this request "
            f"and planning costs {cost:.3g} GB-s ({plan_s * 1e3:.0f} ms x {main_gb:g} GB)")


def all_local_main_gb(config: MeshConfig, model: MoEConfig, profiles: Profiles | None = None) -> float:
    """Main-function memory of the serverful baseline (every expert resident), for the meter."""
    profiles = profiles or profiles_of(config, model)
    shape = profiles.shape
    workload = Workload(prompt_tokens=64, new_tokens=32)
    forecast = Forecast.uniform(shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k)
    plan = allocator.make_plan("all-local", forecast, profiles, slo_of(config), cluster_of(config), workload)
    return plan.main.memory_gb


def reasons(plan: Plan) -> str:
    """moemesh's reasons, for the re-plan log: the start it refined, the reuse its INIT was
    spread over and every start candidate's key (relative SLO excess under the forecast and the
    hedged loads, money per request; "in-force": the plan running now): the start is the
    smallest key; then the search's moves from it. "" for other policies."""
    params = plan.params
    if "candidates" not in params:
        return ""
    keys = ", ".join(f"{name} ({key[0]:.3g}, {key[1]:.3g}, ${key[2]:.3g})" for name, key in params["candidates"].items())
    moves = ", ".join(params.get("moves") or ()) or "none"
    return (f"; start {params.get('start')}, reuse {params.get('reuse', 1.0):.1f}, candidates (SLO excess, "
            f"hedged SLO excess, $ per request): {keys}; moves: {moves}")


def describe(plan: Plan, forecast: Forecast | None = None) -> dict:
    """The plan in force and why, as the meter publishes it (tui/ shows it)."""
    return {
        "name": plan.policy,
        "profiles": plan.params.get("profiles", ""),
        "reason": str(plan.params.get("reason", "")),
        "forecast": None if forecast is None else {
            "source": forecast.source, "confidence": float(forecast.confidence),
            "stragglers": [list(s) for s in forecast.stragglers],
            "distribution": np.round(forecast.distribution, 4).tolist()},
        "slo": plan.params.get("slo"),
        "plan": {
            "main_memory_gb": plan.main.memory_gb,
            "local": sorted([list(e) for e in plan.local]),
            "functions": [{"id": f.id, "experts": [list(e) for e in f.experts], "memory_gb": f.memory_gb,
                           "replicas": f.replicas, "nodes": list(f.nodes)} for f in plan.functions],
        },
        "estimate": plan.params.get("estimate"),
    }
