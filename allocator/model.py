"""Inputs every allocator policy takes, besides the forecast.

Every policy has the signature (DESIGN.md "A plan is data", plus one argument)::

    plan(forecast, profiles, slo, cluster, workload, *, warm=(), **policy_options) -> Plan

- ``forecast``  predictor.forecast.Forecast, ``[layers, experts]`` shares and loads.
- ``profiles``  allocator.profiles.Profiles: the model's :class:`ModelShape` plus the latency
                fits measured for (host, model). The shape lives there because profiles are
                stored per (host, model) anyway, so one object says "this model on this host".
- ``slo``       :class:`SLO` (TTFT, TPOT).
- ``cluster``   :class:`Cluster`: nodes, the main node, the platform's memory grid and prices.
- ``workload``  :class:`Workload`: the request's prompt and expected new tokens (N_in, N_out).
                A forecast gives shares, not the prefill/decode split, so it is its own argument.
- ``warm``      instances already running (:class:`WarmInstance`); policies that do not use
                locality ignore it.

Units: memory in GB with 1 GB = 2**30 bytes (cgroup limits and Lambda's "MB" are binary),
time in seconds, money in dollars. Default prices are AWS Lambda x86 list prices (PAPERS.md
section 4) with Remoe's c_gpu = 3 * c_cpu (section 1.5); they are defaults, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from allocator.plan import Expert

BYTES_PER_GB = 2**30
AWS_PRICE_PER_GB_S = 0.0000166667  # x86, us-east-1 (PAPERS.md section 4)
AWS_PRICE_PER_REQUEST = 0.20 / 1_000_000
AWS_SYNC_PAYLOAD_BYTES = 6 * 2**20
BILLING_MODES = ("invocation", "instance")
NODE_KINDS = ("cpu", "gpu")


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {value}")


@dataclass(frozen=True)
class ModelShape:
    """What the allocator needs to know about the MoE model (dense layers are not counted).

    moe_layers:         number of MoE layers L (rows of every ``[layers, experts]`` array)
    experts_per_layer:  routed experts K per MoE layer
    top_k:              experts per token per layer
    hidden:             hidden size d
    bytes_per_expert:   weight bytes of one routed expert
    main_bytes:         weight bytes of everything else (embeddings, attention, norms, gates,
                        shared experts, LM head): what the main function always loads
    kv_bytes_per_token: KV-cache bytes one token adds, summed over all layers
    activation_bytes:   D, bytes of one token's hidden vector on the wire (hidden * dtype bytes)
    """

    moe_layers: int
    experts_per_layer: int
    top_k: int
    hidden: int
    bytes_per_expert: int
    main_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    name: str = ""

    def __post_init__(self) -> None:
        _positive(
            "ModelShape",
            moe_layers=self.moe_layers,
            experts_per_layer=self.experts_per_layer,
            top_k=self.top_k,
            hidden=self.hidden,
            bytes_per_expert=self.bytes_per_expert,
            activation_bytes=self.activation_bytes,
        )
        if self.main_bytes < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("ModelShape: main_bytes and kv_bytes_per_token must be >= 0")
        if self.top_k > self.experts_per_layer:
            raise ValueError(f"ModelShape: top_k {self.top_k} > experts {self.experts_per_layer}")

    @property
    def expert_gb(self) -> float:
        return self.bytes_per_expert / BYTES_PER_GB

    @staticmethod
    def synthetic() -> ModelShape:
        """A small bf16 MoE (8 MoE layers x 16 experts, top-2, hidden 1024, FFN 2816).

        Expert = three 1024 x 2816 bf16 matrices = 17.3 MB; the measured expert times in
        ``Profiles.synthetic`` are of that order on one vCPU.
        """
        hidden, ffn, layers = 1024, 2816, 8
        return ModelShape(
            moe_layers=layers,
            experts_per_layer=16,
            top_k=2,
            hidden=hidden,
            bytes_per_expert=3 * hidden * ffn * 2,
            main_bytes=400 * 2**20,
            kv_bytes_per_token=2 * layers * hidden * 2,
            activation_bytes=hidden * 2,
            name="synthetic-8x16",
        )


@dataclass(frozen=True)
class SLO:
    """Latency objectives of one request class: time to first token and time per output token."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        _positive("SLO", ttft_s=self.ttft_s, tpot_s=self.tpot_s)


@dataclass(frozen=True)
class Workload:
    """The request a plan is made for: N_in prompt tokens, N_out expected new tokens."""

    prompt_tokens: int
    new_tokens: int

    def __post_init__(self) -> None:
        _positive("Workload", prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class Prices:
    """Prices and billing rules of the platform.

    cpu_gb_s / gpu_gb_s: $ per GB-s of memory of a CPU / GPU function
    per_request:         $ per invocation (invocation billing only)
    gb_per_vcpu:         memory that buys one vCPU (Remoe: 1 GB; AWS: 1769 MB)
    billing:             "invocation" (each call's duration, Lambda) or "instance" (spawn to
                         stop, keep-alive included, Knative); DESIGN.md "Billing"
    bill_init:           invocation billing also bills cold-start INIT (AWS since Aug 2025)
    keep_alive_s:        idle time an instance stays up after its last call (instance billing)
    round_s:             invocation billing rounds each call's execution time up to this (AWS:
                         1 ms; ``[billing] round_ms``); 0 = no rounding
    """

    cpu_gb_s: float = AWS_PRICE_PER_GB_S
    gpu_gb_s: float = 3 * AWS_PRICE_PER_GB_S
    per_request: float = AWS_PRICE_PER_REQUEST
    gb_per_vcpu: float = 1.0
    billing: str = "invocation"
    bill_init: bool = True
    keep_alive_s: float = 60.0
    round_s: float = 0.001

    def __post_init__(self) -> None:
        _positive(
            "Prices", cpu_gb_s=self.cpu_gb_s, gpu_gb_s=self.gpu_gb_s, gb_per_vcpu=self.gb_per_vcpu
        )
        if self.per_request < 0 or self.keep_alive_s < 0 or self.round_s < 0:
            raise ValueError("Prices: per_request, keep_alive_s and round_s must be >= 0")
        if self.billing not in BILLING_MODES:
            raise ValueError(
                f"Prices: billing must be one of {BILLING_MODES}, got {self.billing!r}"
            )

    def per_gb_s(self, kind: str) -> float:
        return self.gpu_gb_s if kind == "gpu" else self.cpu_gb_s


@dataclass(frozen=True)
class MemoryGrid:
    """Allowed function sizes: ``minimum_gb + k * step_gb`` for k >= 0, up to ``maximum_gb``.

    Defaults: 0.125 GB floor (Lambda's 128 MB), 0.1 GB steps (Remoe's 100 MB spec step),
    10 GB ceiling (Lambda's 10,240 MB).
    """

    minimum_gb: float = 0.125
    step_gb: float = 0.1
    maximum_gb: float = 10.0

    def __post_init__(self) -> None:
        _positive("MemoryGrid", minimum_gb=self.minimum_gb, step_gb=self.step_gb)
        if self.maximum_gb < self.minimum_gb:
            raise ValueError("MemoryGrid: maximum_gb < minimum_gb")

    def round_up(self, gb: float, maximum_gb: float | None = None) -> float:
        """Smallest grid size >= gb; raises if it exceeds ``maximum_gb`` (default: the grid's)."""
        limit = self.maximum_gb if maximum_gb is None else maximum_gb
        steps = max(0, math.ceil((gb - self.minimum_gb) / self.step_gb - 1e-9))
        size = round(self.minimum_gb + steps * self.step_gb, 9)
        if size > limit + 1e-9:
            raise ValueError(
                f"MemoryGrid: {gb:.3f} GB needs {size:.3f} GB, above the limit {limit:.3f} GB"
            )
        return size

    def round_down(self, gb: float) -> float:
        """Largest grid size <= gb (the minimum if gb is below it)."""
        steps = max(0, math.floor((gb - self.minimum_gb) / self.step_gb + 1e-9))
        return round(self.minimum_gb + steps * self.step_gb, 9)

    def contains(self, gb: float) -> bool:
        steps = (gb - self.minimum_gb) / self.step_gb
        return gb >= self.minimum_gb - 1e-9 and abs(steps - round(steps)) < 1e-6

    def points(self, maximum_gb: float | None = None) -> np.ndarray:
        """Every grid size up to ``maximum_gb`` (default: the grid's ceiling), ascending."""
        limit = self.maximum_gb if maximum_gb is None else maximum_gb
        count = int(math.floor((limit - self.minimum_gb) / self.step_gb + 1e-9)) + 1
        return np.round(self.minimum_gb + self.step_gb * np.arange(max(count, 1)), 9)


@dataclass(frozen=True)
class Node:
    """One host. capacity_gb: memory functions placed on it may use (GPU memory for kind "gpu");
    init_cpus: vCPUs its cold starts may hold at once, each its CPU share (the daemon's init
    gate, nodes/init_gate.py; None: no gate, every cold start forked as soon as it can be)."""

    name: str
    kind: str
    capacity_gb: float
    cpus: int
    init_cpus: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise ValueError(
                f"Node {self.name}: kind must be one of {NODE_KINDS}, got {self.kind!r}"
            )
        _positive(f"Node {self.name}", capacity_gb=self.capacity_gb, cpus=self.cpus)
        if self.init_cpus is not None:
            _positive(f"Node {self.name}", init_cpus=self.init_cpus)


@dataclass(frozen=True)
class Cluster:
    """Where functions may run and on what terms.

    nodes:               every host (the main node included)
    main_node:           name of the host running the main-model function
    grid:                allowed function memory sizes
    prices:              prices and billing rules
    payload_limit_bytes: largest activation payload of one call (Remoe's U_payload; AWS 6 MB)
    main_speed_gb:       the CPU the main function really computes with, as GB of share
                         (threads x gb_per_vcpu); None: as much as its memory buys
    """

    nodes: tuple[Node, ...]
    main_node: str
    grid: MemoryGrid = field(default_factory=MemoryGrid)
    prices: Prices = field(default_factory=Prices)
    payload_limit_bytes: float = AWS_SYNC_PAYLOAD_BYTES
    main_speed_gb: float | None = None

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if not names:
            raise ValueError("Cluster: no nodes")
        if len(set(names)) != len(names):
            raise ValueError(f"Cluster: duplicate node names {names}")
        if self.main_node not in names:
            raise ValueError(f"Cluster: main node {self.main_node!r} not among {names}")
        _positive("Cluster", payload_limit_bytes=self.payload_limit_bytes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"Cluster: no node {name!r}")

    @property
    def main(self) -> Node:
        return self.node(self.main_node)

    def function_nodes(self) -> tuple[Node, ...]:
        """Nodes that host function instances: every node but the main one (the main function's
        host runs no node daemon), or the main node when it is the only one."""
        others = tuple(n for n in self.nodes if n.name != self.main_node)
        return others or (self.main,)

    def main_speed(self, memory_gb: float) -> float:
        """CPU share (as GB) the main function computes with when it holds ``memory_gb``."""
        if self.main_speed_gb is not None:
            return self.main_speed_gb
        return min(memory_gb, self.speed_cap_gb((self.main_node,)))

    def speed_cap_gb(self, node_names: tuple[str, ...]) -> float:
        """Memory above which more memory buys no CPU: smallest cpus * gb_per_vcpu of the nodes."""
        if not node_names:
            return math.inf
        return min(self.node(n).cpus for n in node_names) * self.prices.gb_per_vcpu

    @staticmethod
    def single(
        name: str = "local", kind: str = "cpu", capacity_gb: float = 64.0, cpus: int = 16
    ) -> Cluster:
        return Cluster((Node(name, kind, capacity_gb, cpus),), name)


@dataclass(frozen=True)
class WarmInstance:
    """A function instance already running (kept alive), as the coordinator's registry knows it."""

    function_id: str
    experts: frozenset[Expert]
    memory_gb: float
    node: str = ""

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError(f"WarmInstance {self.function_id}: no experts")
        _positive(f"WarmInstance {self.function_id}", memory_gb=self.memory_gb)
