"""Planning glue: the coordinator's view of the allocator.

Turns the running model and launch.toml into the allocator's inputs (`ModelShape`, `Profiles`,
`Cluster`, `SLO`, `Workload`) and calls the configured policy. The maths lives in `allocator/`;
this module only translates, so a policy sees the same inputs in the coordinator, in
`moemesh plan` and in benchmarks.
"""

from __future__ import annotations

import numpy as np

import allocator
from allocator.model import SLO, Cluster, MemoryGrid, ModelShape, Node, Prices, Workload
from allocator.plan import Plan
from allocator.profiles import Profiles
from mesh.config import MeshConfig
from nodes.model.config import MoEConfig
from predictor.forecast import Forecast


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


def profiles_of(config: MeshConfig, model: MoEConfig) -> Profiles:
    """Synthetic profiles with this model's shape, until `moemesh profile` has measured the host."""
    return Profiles.synthetic(model_shape(model), host="local")


def slo_of(config: MeshConfig, slo_class: str | None = None) -> SLO:
    c = config.slo.classes[slo_class or config.slo.default_class]
    return SLO(c.ttft_s, c.tpot_s)


def make_plan(config: MeshConfig, model: MoEConfig, forecast: Forecast | None = None,
              workload: Workload | None = None, warm=()) -> Plan:
    profiles = profiles_of(config, model)
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


def all_local_main_gb(config: MeshConfig, model: MoEConfig) -> float:
    """Main-function memory of the serverful baseline (every expert resident), for the meter."""
    profiles = profiles_of(config, model)
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


def remote_share(plan: Plan, layers: int, experts: int) -> np.ndarray:
    """[layers, experts] 1 where remote, 0 where local (for displays)."""
    out = np.zeros((layers, experts))
    for layer, e in plan.remote_experts():
        out[layer, e] = 1
    return out
