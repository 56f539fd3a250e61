"""Planning glue: the coordinator's view of the allocator.

Turns the running model and launch.toml into the allocator's inputs (`ModelShape`, `Profiles`,
`Cluster`, `SLO`, `Workload`) and calls the configured policy. The maths lives in `allocator/`;
this module only translates, so a policy sees the same inputs in the coordinator, in
`moemesh plan` and in benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
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
    """Byte counts of the model as the mesh holds it (float32 by default)."""
    hidden = config.hidden_size
    expert_params = 3 * hidden * config.expert_intermediate_size
    if config.attention == "mla":
        q = (hidden * config.q_lora_rank + config.q_lora_rank * config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
             if config.q_lora_rank else hidden * config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim))
        attention = (q + hidden * (config.kv_lora_rank + config.qk_rope_head_dim)
                     + config.kv_lora_rank * config.num_heads * (config.qk_nope_head_dim + config.v_head_dim)
                     + config.num_heads * config.v_head_dim * hidden)
        kv_per_token = config.num_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    else:
        attention = hidden * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
        kv_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim
    dense_layers = config.num_layers - config.num_moe_layers
    shared = 3 * hidden * config.shared_intermediate_size
    main_params = (
        config.num_layers * (attention + 2 * hidden)
        + config.num_moe_layers * (config.num_experts * hidden + shared)
        + dense_layers * 3 * hidden * config.dense_intermediate_size
        + config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    )
    return ModelShape(
        moe_layers=config.num_moe_layers, experts_per_layer=config.num_experts, top_k=config.top_k, hidden=hidden,
        bytes_per_expert=expert_params * dtype_bytes, main_bytes=main_params * dtype_bytes,
        kv_bytes_per_token=kv_per_token * dtype_bytes, activation_bytes=hidden * dtype_bytes,
        name=name or config.family,
    )


def cluster_of(config: MeshConfig) -> Cluster:
    nodes = [Node(n.name, n.kind, n.capacity_gb, max(1, int(round(n.cpus)))) for n in config.nodes]
    main = Node("main", "gpu" if config.coordinator.device.startswith("cuda") else "cpu", 64.0, 2)
    f, b = config.functions, config.billing
    return Cluster(
        (main, *nodes), "main",
        grid=MemoryGrid(minimum_gb=f.min_memory_gb, step_gb=f.memory_step_gb, maximum_gb=f.max_memory_gb),
        prices=Prices(cpu_gb_s=b.price_cpu_gb_s, gpu_gb_s=b.price_gpu_gb_s,
                      per_request=b.price_per_million_requests / 1e6, gb_per_vcpu=f.gb_per_vcpu,
                      billing=b.mode, bill_init=b.bill_init, keep_alive_s=f.keep_alive_s),
        payload_limit_bytes=config.policy.payload_cap_bytes,
    )


def profiles_of(config: MeshConfig, model: MoEConfig, profiles_dir: str | Path | None = None) -> Profiles:
    """The profiles `moemesh profile` stored for (this host, this model), else synthetic ones.

    Looks for `<profiles_dir>/<host>/<model>.json` (profiles_dir: the checkout's profiles/ by
    default; host: this machine's hostname, then "local"; model: the model folder's name, e.g.
    "bundled"). The stored timings are used with this model's shape as the mesh holds it.
    Logs which profiles the allocator gets.
    """
    from mesh.profile import DEFAULT_OUT, default_host, profile_path

    shape = model_shape(model)
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
    log.info("profiles: synthetic (no %s; run `moemesh profile` to measure this host)",
             profile_path(folder, default_host(), name))
    return Profiles.synthetic(shape, host="local")


def slo_of(config: MeshConfig, slo_class: str | None = None) -> SLO:
    c = config.slo.classes[slo_class or config.slo.default_class]
    return SLO(c.ttft_s, c.tpot_s)


def make_plan(config: MeshConfig, model: MoEConfig, forecast: Forecast | None = None,
              workload: Workload | None = None, warm=(), profiles: Profiles | None = None) -> Plan:
    """Run the configured policy (profiles: pass them to skip reading the stored ones again)."""
    profiles = profiles or profiles_of(config, model)
    shape = profiles.shape
    workload = workload or Workload(prompt_tokens=64, new_tokens=32)
    if forecast is None:
        forecast = Forecast.uniform(shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k)
    options = {"warm": tuple(warm)}
    name = config.policy.name
    if name == "static-split":
        options["remote"] = [tuple(e) for e in config.policy.remote]
    if name in ("all-remote", "static-split") and config.policy.function_memory_gb:
        options["memory_gb"] = config.policy.function_memory_gb
    return allocator.make_plan(name, forecast, profiles, slo_of(config), cluster_of(config), workload, **options)


def all_local_main_gb(config: MeshConfig, model: MoEConfig, profiles: Profiles | None = None) -> float:
    """Main-function memory of the serverful baseline (every expert resident), for the meter."""
    profiles = profiles or profiles_of(config, model)
    shape = profiles.shape
    workload = Workload(prompt_tokens=64, new_tokens=32)
    forecast = Forecast.uniform(shape.moe_layers, shape.experts_per_layer, workload.total_tokens, shape.top_k)
    plan = allocator.make_plan("all-local", forecast, profiles, slo_of(config), cluster_of(config), workload)
    return plan.main.memory_gb


def describe(plan: Plan, forecast: Forecast | None = None) -> dict:
    """The plan in force and why, as the meter publishes it (tui/ shows it)."""
    return {
        "name": plan.policy,
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
