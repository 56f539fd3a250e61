"""A plan is data: what the coordinator executes, whatever policy produced it.

Every policy is ``plan(forecast, profiles, slo, cluster) -> Plan``. The coordinator runs any plan
the same way, so policies change cost and latency, never tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Expert = tuple[int, int]  # (moe_layer_index, expert_index)


@dataclass(frozen=True)
class FunctionSpec:
    """One remote expert function: a set of experts served by `replicas` identical instances.

    id:        stable name, e.g. "L3-r0" (the coordinator keys warm instances by it)
    experts:   (layer, expert) pairs whose weights each instance loads
    memory_gb: memory size of each instance (its CPU share follows it)
    replicas:  identical instances; the coordinator splits a call's tokens across them
    nodes:     preferred node per replica (len == replicas), or () to let the coordinator choose
    """

    id: str
    experts: tuple[Expert, ...]
    memory_gb: float
    replicas: int = 1
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError(f"FunctionSpec {self.id}: no experts")
        if self.replicas < 1:
            raise ValueError(f"FunctionSpec {self.id}: replicas must be >= 1, got {self.replicas}")
        if self.memory_gb <= 0:
            raise ValueError(f"FunctionSpec {self.id}: memory_gb must be > 0")
        if self.nodes and len(self.nodes) != self.replicas:
            raise ValueError(f"FunctionSpec {self.id}: {len(self.nodes)} nodes for {self.replicas} replicas")


@dataclass(frozen=True)
class MainSpec:
    memory_gb: float
    device: str = "cpu"


@dataclass(frozen=True)
class Plan:
    """main: the main-model function; local: experts kept in it; functions: remote experts.

    micro_batch_tokens: per MoE layer, tokens per scatter call (0 = no split beyond the payload cap)
    params: the policy's inputs and reasons (forecast summary, constraints, chosen sizes), for the record
    capacity_factor: expert capacity for token dropping (allocator.capacity.capacity_drop); 0 = drop nothing
    """

    policy: str
    main: MainSpec
    local: frozenset[Expert]
    functions: tuple[FunctionSpec, ...]
    micro_batch_tokens: tuple[int, ...] = ()
    params: dict = field(default_factory=dict)
    capacity_factor: float = 0.0

    def remote_experts(self) -> set[Expert]:
        return {e for f in self.functions for e in f.experts}

    def validate(self, layers: int, experts: int) -> None:
        """Every (layer, expert) is served exactly once: locally or by one function."""
        remote: dict[Expert, str] = {}
        for f in self.functions:
            for e in f.experts:
                if e in remote:
                    raise ValueError(f"plan {self.policy}: expert {e} in {remote[e]} and {f.id}")
                remote[e] = f.id
        both = self.local & remote.keys()
        if both:
            raise ValueError(f"plan {self.policy}: experts both local and remote: {sorted(both)[:4]}")
        everything = {(layer, e) for layer in range(layers) for e in range(experts)}
        missing = everything - self.local - remote.keys()
        if missing:
            raise ValueError(f"plan {self.policy}: experts served nowhere: {sorted(missing)[:4]}")
        extra = (self.local | remote.keys()) - everything
        if extra:
            raise ValueError(f"plan {self.policy}: unknown experts {sorted(extra)[:4]}")
