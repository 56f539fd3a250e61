"""The one estimator every policy is judged by: TTFT, TPOT, billed GB-s and money of a plan.

Source: Remoe's latency and cost model (PAPERS.md 1.3) generalised to any plan (section 5):

- Per MoE layer and phase, *branches* run in parallel: the main function's local experts
  (one branch, no transfer), and each function's experts of that layer (one branch per
  function; ``replicas`` instances share a call's tokens evenly). A branch called on a step
  takes ``sum_k expert_time(memory, tokens_k) + scatter_gather(2 * D * tokens)`` (the local
  branch has no transfer). Tokens fractional in expectation: see ExpertLatency.expected_seconds.
- A step is prefill (loads = the prompt's token-slots) or one decode token (loads / N_out).
  A branch is called with probability ``P_b = max(1 - prod_k (1 - min(n_k, 1)),
  min(1, sum_k n_k / top_k))`` (independent experts, or all top_k slots in the branch), and
  given a call carries ``n_k / P_b`` slots of expert k. The layer waits for the slowest
  called branch: ``E[max] = sum_i t_i P_i prod_{j<i} (1 - P_j)`` over branches sorted by
  their time t descending (exact if calls are independent and times fixed), rescaled so the
  weights sum to the layer's own call probability ``max(1 - prod_b (1 - P_b), min(1,
  sum slots / top_k))``: top_k routing calls some branch on every token, which independent
  branches would miss ``prod (1 - P_b)`` of the time. Prefill loads
  are large, so ``P_b ~ 1`` and this is Remoe's ``max(local, max_j ZT_lj)``; one branch per
  layer gives Remoe's decode ``sum_k s_k tc1 + trem``; one expert per function gives the
  max over the top_k called functions (not their sum or mean).
- TTFT walks the layers from the main cold start: layer l waits for the dense part, then
  for its called functions to be ready, then its expert phase. Every cold replica is spawned
  at admission (Remoe 1.7, DESIGN.md step 3), but not in parallel: each node's zygote forks
  them one at a time and their INITs share the node's CPUs (allocator.coldstart; measured,
  the 24th fork of a node is ready ~1.6 s after the first). A function needed only for
  decode and still cold at TTFT delays the first decode token. The main function is busy,
  and billed, while it waits. TPOT = decode time / N_out.
- Billing (DESIGN.md "Billing", PAPERS.md 5), per GB-s at the CPU or GPU price of the node
  kind (a function is GPU when all its nodes are GPU nodes; no nodes = CPU):
  *invocation*: each instance's expected calls x its compute per call rounded up to
  ``prices.round_s`` (Lambda's 1 ms; the transfer is not the function's time), plus INIT of
  cold instances (the simulated INIT, the fork excluded, as the meter bills it) when
  ``bill_init``, plus ``per_request`` per expected call; *instance*: every instance from spawn
  to the end of the request plus keep-alive. The main function is billed for the whole
  request (it drives it); a GPU main bills its non-expert part at the GPU price and the rest
  (local experts, CPU-share padding) at the CPU price when the experts sit in host memory
  (``plan.params["local_experts_device"] == "cpu"``, Remoe's ``c_g M_g + c_c m_w``), else all
  of it at the GPU price: see :func:`main_memory_split`.

Warm instances (``warm``) match a planned replica when they hold exactly its experts with
the same memory (and, if the plan names nodes, on that node): no cold start, no INIT.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import numpy as np

from allocator.coldstart import ColdReplica, cold_timeline, place_cold
from allocator.model import SLO, Cluster, WarmInstance, Workload
from allocator.plan import Plan
from allocator.profiles import Profiles
from allocator.sizing import main_required_gb
from predictor.forecast import Activation, Forecast

LOCAL_EXPERTS_DEVICES = ("cpu", "main")


@dataclass(frozen=True)
class Loads:
    """Token-slots per expert for one request.

    prefill: [layers, experts] slots routed to each expert by the prompt's N_in tokens
    decode:  [layers, experts] slots routed over all N_out decode steps
    """

    prefill: np.ndarray
    decode: np.ndarray

    def __post_init__(self) -> None:
        if self.prefill.ndim != 2 or self.prefill.shape != self.decode.shape:
            raise ValueError(
                f"Loads: prefill {self.prefill.shape} and decode {self.decode.shape} must be [layers, experts]"
            )
        if np.any(self.prefill < 0) or np.any(self.decode < 0):
            raise ValueError("Loads: negative token counts")

    @staticmethod
    def from_forecast(forecast: Forecast, workload: Workload, top_k: int) -> Loads:
        """Expected slots: ``distribution * N * top_k`` for N = N_in (prefill) and N_out (decode)."""
        d = np.asarray(forecast.distribution, dtype=float)
        return Loads(d * workload.prompt_tokens * top_k, d * workload.new_tokens * top_k)

    @staticmethod
    def from_activation(activation: Activation) -> Loads:
        """What really happened (to judge a plan against the realised routing)."""
        return Loads(
            np.asarray(activation.prefill, dtype=float), np.asarray(activation.decode, dtype=float)
        )

    def hedged(self, confidence: float) -> Loads:
        """Blend each layer toward uniform by ``1 - confidence``, keeping every layer's total."""
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"Loads.hedged: confidence {confidence} outside [0, 1]")

        def blend(loads: np.ndarray) -> np.ndarray:
            uniform = np.repeat(loads.mean(axis=1, keepdims=True), loads.shape[1], axis=1)
            return confidence * loads + (1.0 - confidence) * uniform

        return Loads(blend(self.prefill), blend(self.decode))


@dataclass(frozen=True)
class Estimate:
    """What a plan is expected to cost and how fast it is, for one request.

    layer_prefill_s: [layers] expert-phase time of each layer in prefill
    layer_decode_s:  [layers] expert-phase time of each layer per decode token
    function_gb_s:   function id -> billed GB-s (all its replicas)
    """

    ttft_s: float
    tpot_s: float
    prefill_s: float
    decode_s: float
    wall_s: float
    main_cold_s: float
    main_gb_s: float
    function_gb_s: dict[str, float]
    cpu_gb_s: float
    gpu_gb_s: float
    invocations: float
    money: float
    layer_prefill_s: tuple[float, ...]
    layer_decode_s: tuple[float, ...]
    function_init_gb_s: float = 0.0
    init_money: float = 0.0  # the part of ``money`` that is the cold replicas' INIT

    @property
    def billed_gb_s(self) -> float:
        return self.cpu_gb_s + self.gpu_gb_s

    def amortised_money(self, reuse: float) -> float:
        """Money per request when this request's cold starts serve ``reuse`` requests in all
        (>= 1): the INIT is paid once for the instances the next requests find warm."""
        if reuse < 1:
            raise ValueError(f"amortised_money: reuse must be >= 1, got {reuse}")
        return self.money - self.init_money * (1.0 - 1.0 / reuse)

    def slo_violation(self, slo: SLO) -> float:
        """0 when both SLOs hold, else the worse relative excess (0.1 = 10 % over)."""
        return max(self.ttft_s / slo.ttft_s - 1.0, self.tpot_s / slo.tpot_s - 1.0, 0.0)

    def meets(self, slo: SLO) -> bool:
        return self.slo_violation(slo) <= 1e-12

    def summary(self) -> dict:
        """JSON-friendly figures for ``plan.params["estimate"]``."""
        figures = {
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "main_cold_s": self.main_cold_s,
            "main_gb_s": self.main_gb_s,
            "functions_gb_s": sum(self.function_gb_s.values()),
            "functions_init_gb_s": self.function_init_gb_s,
            "functions_busy_gb_s": sum(self.function_gb_s.values()) - self.function_init_gb_s,
            "wall_s": self.wall_s,
            "cpu_gb_s": self.cpu_gb_s,
            "gpu_gb_s": self.gpu_gb_s,
            "billed_gb_s": self.billed_gb_s,
            "invocations": self.invocations,
            "money": self.money,
        }
        return {k: float(f"{v:.6g}") for k, v in figures.items()}


@dataclass
class _Branches:
    """Flat tables: one row per branch (layer x server) and one per served expert (entry)."""

    layer: np.ndarray  # [branches] int
    remote: np.ndarray  # [branches] bool
    gpu: np.ndarray  # [branches] bool
    speed_gb: np.ndarray  # [branches] memory that sets CPU speed
    replicas: np.ndarray  # [branches] float
    function: np.ndarray  # [branches] int, -1 for the local branch
    entry_branch: np.ndarray  # [entries] int
    entry_layer: np.ndarray  # [entries] int
    entry_expert: np.ndarray  # [entries] int


def _branches(plan: Plan, cluster: Cluster) -> _Branches:
    local_device = plan.params.get("local_experts_device", "cpu")
    if local_device not in LOCAL_EXPERTS_DEVICES:
        raise ValueError(
            f"plan {plan.policy}: local_experts_device {local_device!r} not in {LOCAL_EXPERTS_DEVICES}"
        )
    local_gpu = local_device == "main" and plan.main.device == "gpu"
    main_speed = cluster.main_speed(plan.main.memory_gb)
    rows: list[tuple[int, bool, bool, float, int, int]] = []
    entries: list[tuple[int, int, int]] = []

    def add(
        function_index: int, remote: bool, gpu: bool, speed: float, replicas: int, experts
    ) -> None:
        by_layer: dict[int, list[int]] = defaultdict(list)
        for layer, expert in experts:
            by_layer[layer].append(expert)
        for layer in sorted(by_layer):
            rows.append((layer, remote, gpu, speed, replicas, function_index))
            entries.extend((len(rows) - 1, layer, e) for e in by_layer[layer])

    add(-1, False, local_gpu, main_speed, 1, sorted(plan.local))
    for index, function in enumerate(plan.functions):
        gpu = bool(function.nodes) and all(cluster.node(n).kind == "gpu" for n in function.nodes)
        speed = min(function.memory_gb, cluster.speed_cap_gb(function.nodes))
        add(index, True, gpu, speed, function.replicas, function.experts)
    table = np.array(rows, dtype=float).reshape(-1, 6)
    entry = np.array(entries, dtype=int).reshape(-1, 3)
    return _Branches(
        layer=table[:, 0].astype(int),
        remote=table[:, 1].astype(bool),
        gpu=table[:, 2].astype(bool),
        speed_gb=table[:, 3],
        replicas=table[:, 4],
        function=table[:, 5].astype(int),
        entry_branch=entry[:, 0],
        entry_layer=entry[:, 1],
        entry_expert=entry[:, 2],
    )


@dataclass
class _Phase:
    probability: np.ndarray  # [branches] chance the branch is called on a step
    time_s: np.ndarray  # [branches] call time when called
    busy_s: np.ndarray  # [branches] expected billed instance-seconds per step (all replicas)
    calls: np.ndarray  # [branches] expected calls per step (all replicas)
    layer_s: np.ndarray  # [layers] expected expert-phase time per step


def main_memory_split(
    memory_gb: float, device: str, experts_on_host: bool, profiles: Profiles, workload: Workload
) -> tuple[float, float]:
    """(host GB at the CPU price, device GB at the GPU price) of a main function.

    A CPU main is all host memory. A GPU main holds the non-expert part (weights, KV cache,
    activations, runtime) on the GPU; with its experts in host memory (Remoe's ``M_g`` and
    ``m_w``), the rest (local experts and any CPU-share padding, Remoe's ``M_cal``) is host
    memory, else everything is device memory.
    """
    if device != "gpu":
        return memory_gb, 0.0
    if not experts_on_host:
        return 0.0, memory_gb
    device_gb = min(memory_gb, main_required_gb(0, profiles, workload))
    return memory_gb - device_gb, device_gb


def call_probability(slots: np.ndarray, top_k: int) -> float:
    """Chance that a step calls a branch whose experts receive ``slots`` [experts] on average."""
    total = float(np.sum(slots))
    if total <= 0:
        return 0.0
    miss = float(np.prod(1.0 - np.minimum(slots, 1.0)))
    return max(1.0 - miss, min(1.0, total / top_k))


def billed_call_s(compute_s, round_s: float):
    """A call's billed execution time: its compute rounded up to ``round_s`` (0: not rounded)."""
    compute = np.asarray(compute_s, dtype=float)
    if round_s <= 0:
        return compute
    return np.where(compute > 0, np.ceil(compute / round_s - 1e-9) * round_s, 0.0)


def spaced_call_s(full_s, share, period_s: float):
    """A CPU call's time when it starts with its CFS quota unspent: ``full_s`` seconds of work
    at full speed, run at full speed until the period's quota (``share x period_s``) is spent,
    then a wait for the next period, and so on: ``full_s + max(0, full_s / quota - 1) x (period
    - quota)`` (exact at whole multiples of the quota, linear between). A share of a whole vCPU
    or more is never throttled (one thread)."""
    full = np.asarray(full_s, dtype=float)
    quota = np.asarray(share, dtype=float) * period_s
    stalls = np.maximum(full / np.maximum(quota, 1e-12) - 1.0, 0.0) * np.maximum(period_s - quota, 0.0)
    return full + stalls


def _phase(
    slots: np.ndarray,
    branches: _Branches,
    profiles: Profiles,
    layers: int,
    round_s: float = 0.0,
    vcpus: float = np.inf,
    gb_per_vcpu: float = 1.0,
    step_s: float | None = None,
) -> _Phase:
    """slots: [entries] expected token-slots of each served expert on one step.

    A remote call is billed (invocation mode) for its own compute rounded up to ``round_s``,
    not for the transfer: the meter bills the worker's own execution time
    (``profiles.billed_expert``; the call's latency, ``profiles.expert``, also holds the CFS
    stalls a small CPU share waits out before its call starts, which nobody bills).

    Branches of a layer run in parallel only as far as the function nodes' CPUs allow: a layer
    takes at least its remote CPU branches' expected work (seconds x vCPU share, summed) over
    ``vcpus``, the function nodes' vCPUs together (measured here: a round's ~4 workers on the
    2 cores took 2.2-3.2 ms of summed compute against 1.0-1.3 ms for the slowest one).

    The expert curve is measured back to back, where a function below a whole vCPU waits out
    its CFS quota on every call; in the mesh most functions are called a few times a second
    and find their quota unspent. With ``profiles.cfs_period_s`` known, a CPU function's call
    takes ``spaced_call_s`` of its full-speed work, blended towards the back-to-back curve by
    its utilisation (CPU demand over its share: calls per second x full-speed work / share,
    from ``step_s``, the step time; None: one call per phase, as a prefill's). Measured here
    at 0.125 GB, one-token calls: 8.6 ms back to back, 0.35 ms of work spaced 20 ms apart."""
    count = branches.layer.size
    top_k = profiles.shape.top_k
    hit = np.minimum(slots, 1.0 - 1e-12)
    miss = np.exp(np.bincount(branches.entry_branch, np.log1p(-hit), count))
    total = np.bincount(branches.entry_branch, slots, count)
    probability = np.where(total > 0, np.maximum(1.0 - miss, np.minimum(1.0, total / top_k)), 0.0)
    safe = np.where(probability > 0, probability, 1.0)
    call_tokens = total / safe
    spread = np.where(branches.remote, np.clip(call_tokens, 1.0, branches.replicas), 1.0)
    tokens = slots / (safe * spread)[branches.entry_branch]
    on_gpu = branches.gpu[branches.entry_branch]
    work = np.where(
        on_gpu,
        profiles.gpu_expert.expected(tokens),
        profiles.expert.expected_seconds(branches.speed_gb[branches.entry_branch], tokens),
    )
    compute = np.bincount(branches.entry_branch, work, count)
    billed_work = np.where(
        on_gpu,
        work,
        profiles.billed_expert.expected_seconds(branches.speed_gb[branches.entry_branch], tokens),
    )
    billed_compute = np.bincount(branches.entry_branch, billed_work, count)
    if profiles.cfs_period_s is not None:  # calls that find their quota unspent (docstring)
        cpu_remote = branches.remote & ~branches.gpu
        full = np.bincount(branches.entry_branch,
                           np.where(on_gpu, 0.0, profiles.expert.expected_seconds(profiles.full_speed_gb, tokens)),
                           count)
        share = branches.speed_gb / gb_per_vcpu
        spaced = spaced_call_s(full, share, profiles.cfs_period_s)
        if step_s:
            rate = probability * spread / np.maximum(branches.replicas, 1.0) / step_s  # calls/s an instance
            busy = np.clip(rate * full / np.maximum(share, 1e-12), 0.0, 1.0)
        else:
            busy = np.zeros(count)
        compute = np.where(cpu_remote, spaced + (compute - spaced) * busy, compute)
        billed_compute = np.where(cpu_remote, spaced + (billed_compute - spaced) * busy, billed_compute)
    payload = 2.0 * profiles.shape.activation_bytes * call_tokens / spread
    transfer = np.where(branches.remote, profiles.scatter_gather(payload), 0.0)
    time_s = np.where(probability > 0, compute + transfer, 0.0)
    billed = np.where(probability > 0, billed_call_s(billed_compute, round_s), 0.0)
    layer_s = np.zeros(layers)
    layer_slots = np.bincount(branches.layer, total, layers)
    for layer in range(layers):
        members = np.flatnonzero(branches.layer == layer)
        order = members[np.argsort(-time_s[members], kind="stable")]
        survive = np.concatenate([[1.0], np.cumprod(1.0 - probability[order])[:-1]])
        weight = probability[order] * survive  # P(branch i is the slowest one called)
        independent = float(weight.sum())  # = 1 - prod(1 - P): P(any call) if independent
        called = max(independent, min(1.0, layer_slots[layer] / top_k))
        scale = called / independent if independent > 0 else 0.0
        layer_s[layer] = float(np.sum(time_s[order] * weight)) * scale
    cpu = branches.remote & ~branches.gpu
    if np.isfinite(vcpus) and cpu.any():
        used_gb = np.minimum(branches.speed_gb, getattr(profiles.expert.curve, "saturation_gb", np.inf))
        work = probability * spread * compute * used_gb / gb_per_vcpu  # vCPU-seconds per step
        floor = np.bincount(branches.layer[cpu], work[cpu], layers) / vcpus
        layer_s = np.maximum(layer_s, floor)
    return _Phase(probability, time_s, probability * billed * spread, probability * spread, layer_s)


def _cold_replicas(plan: Plan, warm: Sequence[WarmInstance]) -> list[int]:
    """Per function, how many of its replicas no warm instance covers (each instance used once)."""
    available: dict[tuple[frozenset, float], list[str]] = defaultdict(list)
    for instance in warm:
        available[(instance.experts, round(instance.memory_gb, 6))].append(instance.node)
    cold = []
    for function in plan.functions:
        pool = available.get((frozenset(function.experts), round(function.memory_gb, 6)), [])
        missing = 0
        for replica in range(function.replicas):
            node = function.nodes[replica] if function.nodes else ""
            match = next((i for i, n in enumerate(pool) if not node or not n or n == node), None)
            if match is None:
                missing += 1
            else:
                pool.pop(match)
        cold.append(missing)
    return cold


def estimate(
    plan: Plan,
    loads: Loads,
    profiles: Profiles,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
    main_warm: bool = False,
    main_held: Collection[tuple[int, int]] | None = None,
) -> Estimate:
    """Expected TTFT, TPOT, GB-s and money of ``plan`` when routing follows ``loads``.

    The main function: cold (its start-up is on the TTFT) unless ``main_held`` (up, holding
    these experts: a re-plan's candidate loads the local experts it lacks before the prefill, at
    ``Profiles.weights_s``, billed like a cold start); ``main_warm``: up, holding the plan's own
    local experts (``main_held=plan.local``)."""
    shape = profiles.shape
    layers, experts = shape.moe_layers, shape.experts_per_layer
    if loads.prefill.shape != (layers, experts):
        raise ValueError(f"estimate: loads are {loads.prefill.shape}, model is {(layers, experts)}")
    plan.validate(layers, experts)
    prices = cluster.prices
    branches = _branches(plan, cluster)
    where = (branches.entry_layer, branches.entry_expert)
    round_s = prices.round_s if prices.billing == "invocation" else 0.0
    vcpus = float(sum(n.cpus for n in cluster.function_nodes() if n.kind != "gpu")) or np.inf
    share = dict(vcpus=vcpus, gb_per_vcpu=prices.gb_per_vcpu)
    prefill = _phase(loads.prefill[where], branches, profiles, layers, round_s, **share)
    decode_slots = loads.decode[where] / workload.new_tokens
    decode = _phase(decode_slots, branches, profiles, layers, round_s, **share)
    if profiles.cfs_period_s is not None:  # how busy each function is depends on the step time
        first_step = layers * float(profiles.dense(1)) + float(decode.layer_s.sum())
        decode = _phase(decode_slots, branches, profiles, layers, round_s, **share, step_s=first_step)

    # Cold starts: every cold replica spawns at admission, forked one at a time per node and
    # sharing the node's CPUs in INIT (allocator.coldstart), while the main function runs.
    count = len(plan.functions)
    cold_replicas = _cold_replicas(plan, warm)
    timeline = cold_timeline(
        [
            ColdReplica(
                index,
                node,
                profiles.spawn_s,
                float(profiles.init_s(len(plan.functions[index].experts) * shape.bytes_per_expert)),
                # INIT runs at the instance's CPU quota (it joins its cgroup first), one thread
                min(1.0, plan.functions[index].memory_gb / prices.gb_per_vcpu),
                profiles.init_fixed_s,
            )
            for index, node in place_cold(plan, cold_replicas, cluster, warm)
        ],
        cluster,
        profiles.spawn_shares,
    )
    ready_s = np.append(timeline.function_ready_s(count), 0.0)
    main_bytes = shape.main_bytes + len(plan.local) * shape.bytes_per_expert
    if main_warm:
        main_held = plan.local
    if main_held is None:
        main_cold = float(profiles.main_cold_start(main_bytes))
    else:
        held = set(map(tuple, main_held))
        missing = sum(1 for e in plan.local if tuple(e) not in held)
        main_cold = float(profiles.weights_s(missing * shape.bytes_per_expert))

    dense_prefill = float(profiles.dense(workload.prompt_tokens))
    clock = main_cold
    for layer in range(layers):
        called = (branches.layer == layer) & branches.remote & (prefill.probability > 0)
        clock = max(
            clock + dense_prefill, float(ready_s[branches.function[called]].max(initial=0.0))
        )
        clock += prefill.layer_s[layer]
    ttft = clock
    prefill_s = layers * dense_prefill + float(prefill.layer_s.sum())
    step_s = layers * float(profiles.dense(1)) + float(decode.layer_s.sum())
    late = max(0.0, float(ready_s.max()) - ttft)
    decode_s = workload.new_tokens * step_s + late
    wall = ttft + decode_s

    # Billing.
    invocation = prices.billing == "invocation"
    remote = branches.function >= 0
    owner = branches.function[remote]
    busy = np.bincount(
        owner, prefill.busy_s[remote] + workload.new_tokens * decode.busy_s[remote], count
    )
    calls = 1.0 + float(np.sum(prefill.calls[remote] + workload.new_tokens * decode.calls[remote]))
    on_gpu = np.bincount(owner, branches.gpu[remote].astype(float), count) > 0
    memory = np.array([f.memory_gb for f in plan.functions])
    init = timeline.function_init_s(count) if invocation and prices.bill_init else np.zeros(count)
    if invocation:
        seconds = busy + init
    else:
        seconds = np.array([f.replicas for f in plan.functions], dtype=float) * (
            wall + prices.keep_alive_s
        )
    gb_s = memory * seconds if count else np.zeros(0)
    init_gb_s = float(np.sum(memory * init)) if count else 0.0
    init_money = (
        float(np.sum(memory * init * np.where(on_gpu, prices.gpu_gb_s, prices.cpu_gb_s)))
        if count
        else 0.0
    )
    function_gb_s = {f.id: float(v) for f, v in zip(plan.functions, gb_s)}
    gpu_gb_s = float(gb_s[on_gpu].sum()) if count else 0.0
    cpu_gb_s = float(gb_s.sum()) - gpu_gb_s if count else 0.0
    if invocation:
        main_seconds = wall - main_cold + (main_cold if prices.bill_init else 0.0)
    else:
        main_seconds = wall + prices.keep_alive_s
    main_gb_s = plan.main.memory_gb * main_seconds
    host_gb, device_gb = main_memory_split(
        plan.main.memory_gb,
        plan.main.device,
        plan.params.get("local_experts_device", "cpu") == "cpu",
        profiles,
        workload,
    )
    cpu_gb_s += host_gb * main_seconds
    gpu_gb_s += device_gb * main_seconds
    money = (
        cpu_gb_s * prices.cpu_gb_s
        + gpu_gb_s * prices.gpu_gb_s
        + (calls * prices.per_request if invocation else 0.0)
    )
    return Estimate(
        ttft_s=ttft,
        tpot_s=decode_s / workload.new_tokens,
        prefill_s=prefill_s,
        decode_s=decode_s,
        wall_s=wall,
        main_cold_s=main_cold,
        main_gb_s=main_gb_s,
        function_gb_s=function_gb_s,
        function_init_gb_s=init_gb_s,
        init_money=init_money,
        cpu_gb_s=cpu_gb_s,
        gpu_gb_s=gpu_gb_s,
        invocations=calls,
        money=money,
        layer_prefill_s=tuple(float(v) for v in prefill.layer_s),
        layer_decode_s=tuple(float(v) for v in decode.layer_s),
    )


def annotate(
    plan: Plan,
    forecast: Forecast,
    profiles: Profiles,
    cluster: Cluster,
    workload: Workload,
    *,
    warm: Sequence[WarmInstance] = (),
) -> Plan:
    """``plan`` with ``params["estimate"]`` = the estimator's figures under its own forecast."""
    loads = Loads.from_forecast(forecast, workload, profiles.shape.top_k)
    figures = estimate(plan, loads, profiles, cluster, workload, warm=warm).summary()
    return replace(plan, params={**plan.params, "estimate": figures})
