"""Configuration: `launch.toml` -> frozen, validated dataclasses.

    cfg = load_config("launch.toml", overrides={"coordinator.client_port": 0})
    cfg.coordinator.client_port, cfg.nodes[0].capacity_gb, cfg.addresses.client

One source of truth: the file sets everything, command-line flags only override keys (dotted,
e.g. "nodes[1].cpus"), and the resulting `MeshConfig` travels to spawned processes explicitly
as `to_dict()` / `from_dict()` (msgpack or JSON, never pickle). No environment variables.

Every section validates itself in `__post_init__`, so a config built in code is checked the same
way as one read from a file. Errors are `ConfigError`s naming the file and the dotted key:

    launch.toml: nodes[1].capacity_gb: expected a number > 0, got "abc"
    launch.toml: functions.keep_alive: unknown key; did you mean "keep_alive_s"?

Units are in the key names: `_s` seconds, `_gb` gigabytes, `_us` microseconds, `_ms`
milliseconds, `_bytes` bytes, `_gb_s` dollars per GB-second.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Union

from mesh.errors import ConfigError, RequestRejected

__all__ = [
    "AWS_LAMBDA_X86_PRICE_GB_S",
    "BUNDLED_MODEL",
    "KNOWN_POLICIES",
    "Addresses",
    "BillingConfig",
    "CoordinatorConfig",
    "FunctionsConfig",
    "HostConfig",
    "HttpConfig",
    "MeshConfig",
    "MeterConfig",
    "ModelConfig",
    "NodeConfig",
    "PolicyConfig",
    "PredictorConfig",
    "SecurityConfig",
    "SloClass",
    "SloConfig",
    "load_config",
    "parse_override",
    "register_policy",
]

# Policy names `policy.name` may take. The coordinator registers more with register_policy().
KNOWN_POLICIES: tuple[str, ...] = (
    "all-local",
    "all-remote",
    "static-split",
    "mix",
    "remoe",
    "moeless",
    "bayesian",
    "moemesh",
    # the papers' baselines (allocator/paper_baselines.py)
    "cpu-only",
    "gpu-only",
    "fetch",
    "lambdaml",
    "cpu-cluster",
    "static-ep",
    "eplb",
    "capacity-factor",
    "oracle",
)

BUNDLED_MODEL = "bundled"  # model.path naming the tiny model shipped in nodes/bundled/
AWS_LAMBDA_X86_PRICE_GB_S = 0.0000166667  # $/GB-s, AWS Lambda x86 list price (us-east-1)
GPU_PRICE_RATIO = 3.0  # GPU GB-s cost >= 3x CPU GB-s (Remoe's c_g / c_c)
RESERVED_SLO_CLASS = "default"  # GenerateRequest.slo_class "default" means slo.default_class


def register_policy(name: str) -> None:
    """Let `policy.name` take `name` (for policies defined outside this list)."""
    global KNOWN_POLICIES
    if name not in KNOWN_POLICIES:
        KNOWN_POLICIES = (*KNOWN_POLICIES, name)


# ------------------------------------------------------------------------------ field rules


@dataclass(frozen=True)
class Rule:
    """A constraint on a value beyond its type; `words` completes "expected a number ..."."""

    words: str
    ok: Callable[[Any], bool]


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: v > low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low)


def between(low: float, high: float) -> Rule:
    return Rule(f"from {low} to {high}", lambda v: low <= v <= high)


NOT_EMPTY = Rule("that is not empty", lambda v: v != "")
PORT = Rule("from 0 to 65535 (0 = pick a free port)", lambda v: 0 <= v <= 65535)


def setting(default: Any = MISSING, rule: Rule | None = None, *, factory: Any = MISSING) -> Any:
    """A config field: its default (or default factory) and the rule its value must meet."""
    metadata = {"rule": rule} if rule is not None else {}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def _show(value: Any) -> str:
    """A value as TOML-ish text for error messages: strings in double quotes, true/false."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(words: str, rule: Rule | None, value: Any, key: str) -> ConfigError:
    wanted = f"{words} {rule.words}" if rule is not None else words
    return ConfigError(f"expected {wanted}, got {_show(value)}", key=key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str, rule: Rule | None = None) -> Any:
    """`value` checked against a type hint (and rule), normalised: float from int, tuple from
    list, read-only mapping from dict, dataclass from table. Raises ConfigError at `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value  # validated when it was built
        try:
            return _build(hint, value)
        except ConfigError as exc:
            raise exc.under(key) from None
    if hint is bool:
        if type(value) is not bool:
            raise _expected("true or false", None, value, key)
        return value
    if hint is int:
        if type(value) is not int or (rule is not None and not rule.ok(value)):
            raise _expected("an integer", rule, value, key)
        return value
    if hint is float:
        ok = type(value) in (int, float) and math.isfinite(value)
        if not ok or (rule is not None and not rule.ok(value)):
            raise _expected("a number", rule, value, key)
        return float(value)
    if hint is str:
        if type(value) is not str or (rule is not None and not rule.ok(value)):
            raise _expected("a string", rule, value, key)
        return value
    if origin is Literal:
        if value not in args or type(value) is not str:
            raise _expected("one of " + ", ".join(_show(a) for a in args), None, value, key)
        return value
    if origin is tuple and args[-1] is Ellipsis:  # tuple[X, ...]: a TOML array
        if not isinstance(value, list | tuple):
            raise _expected("an array", None, value, key)
        return tuple(_coerce(item, args[0], f"{key}[{i}]", rule) for i, item in enumerate(value))
    if origin is tuple:  # tuple[X, Y]: a fixed-length array
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise _expected(f"an array of {len(args)} items", None, value, key)
        return tuple(
            _coerce(item, a, f"{key}[{i}]", rule) for i, (item, a) in enumerate(zip(value, args))
        )
    if origin is Mapping:  # Mapping[str, X]: a table of tables
        if not isinstance(value, Mapping):
            raise _expected("a table", None, value, key)
        return types.MappingProxyType(
            {name: _coerce(item, args[1], f"{key}.{name}") for name, item in value.items()}
        )
    raise TypeError(f"mesh.config: no rule for type hint {hint!r} at {key}")


def _build(cls: type, table: Any) -> Any:
    """A config dataclass from a TOML table: unknown keys are errors with a suggestion."""
    if not isinstance(table, Mapping):
        raise _expected("a table", None, table, "")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6) or [
                name for name in names if name.startswith(str(key)) or str(key).startswith(name)
            ]
            tip = f'did you mean "{close[0]}"?' if close else "known keys: " + ", ".join(names)
            raise ConfigError(f"unknown key; {tip}", key=str(key))
    for f in dataclasses.fields(cls):
        if f.name not in table and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError("missing; this key is required", key=f.name)
    return cls(**table)


def _validate(section: Any) -> None:
    """Check and normalise every field of a config dataclass in place (from __post_init__)."""
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        value = _coerce(getattr(section, f.name), hints[f.name], f.name, f.metadata.get("rule"))
        object.__setattr__(section, f.name, value)


def _to_plain(value: Any) -> Any:
    """Config values as plain dicts, lists and scalars (msgpack / JSON / TOML-able)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {name: _to_plain(item) for name, item in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CoordinatorConfig:
    """[coordinator]: where the coordinator listens and how it batches.

    host:               address it binds and peers dial (set a reachable IP for many hosts)
    client_port:        ROUTER for clients; control_port: ROUTER for node daemons;
    metrics_port:       PUB for metrics (each: 0 = pick a free port and read it back)
    metrics_http_port:  HTTP for Prometheus (/metrics) and /v1/experts/distribution; None:
                        metrics_port + 1, or a free port when metrics_port is 0 (see
                        `resolved_metrics_http_port`); 0 = a free port
    metrics_interval_s: seconds between MetricsSnapshot publications
    device:             where the main model runs: "cpu", "cuda" or "auto" (cuda if present)
    max_batch:          requests decoded together (continuous batching)
    request_timeout_s:  a request still unfinished after this many seconds fails with Timeout
    heartbeat_s:        coordinator <-> node ping interval; liveness: silent intervals before a
                        node is declared dead (Paranoid Pirate)
    threads:            torch threads of the main model
    """

    host: str = setting("127.0.0.1", NOT_EMPTY)
    client_port: int = setting(7555, PORT)
    control_port: int = setting(7556, PORT)
    metrics_port: int = setting(7557, PORT)
    metrics_http_port: int | None = setting(None, PORT)
    metrics_interval_s: float = setting(0.5, above(0))
    device: Literal["cpu", "cuda", "auto"] = "auto"
    max_batch: int = setting(16, at_least(1))
    request_timeout_s: float = setting(120.0, above(0))
    heartbeat_s: float = setting(1.0, above(0))
    liveness: int = setting(5, at_least(1))
    threads: int = setting(1, at_least(1))

    def __post_init__(self) -> None:
        _validate(self)
        seen: dict[int, str] = {}
        for name in ("client_port", "control_port", "metrics_port", "metrics_http_port"):
            port = getattr(self, name) if name != "metrics_http_port" else self.resolved_metrics_http_port()
            if port and port in seen:
                raise ConfigError(
                    f"port {port} is also {seen[port]}; use distinct ports or 0", key=name
                )
            seen[port] = name

    def resolved_metrics_http_port(self) -> int:
        """metrics_http_port, or when absent: metrics_port + 1 (0 when metrics_port is 0, so a
        mesh that asks for free ports gets a free one here too)."""
        if self.metrics_http_port is not None:
            return self.metrics_http_port
        return self.metrics_port + 1 if 0 < self.metrics_port < 65535 else 0


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the checkpoint. path: an HF-layout directory, or "bundled" for the tiny model
    shipped in nodes/bundled/. dtype: dtype of the main model and expert weights.
    routing_zipf: absent = the model's own router; a skew s >= 0 = Zipf(s)-skewed routing
    (MoEless's evaluation, nodes/model/skew.py): which experts run follows the skew, the
    router's scores still weight them; the in-process reference must apply the same skew."""

    path: str = setting(BUNDLED_MODEL, NOT_EMPTY)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    routing_zipf: float | None = setting(None, at_least(0))

    def __post_init__(self) -> None:
        _validate(self)

    def resolved_path(self) -> Path:
        """The checkpoint directory ("bundled" -> the package's nodes/bundled/)."""
        if self.path != BUNDLED_MODEL:
            return Path(self.path)
        spec = importlib.util.find_spec("nodes")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "the bundled model is missing: is moemesh installed?", key="model.path"
            )
        return Path(spec.submodule_search_locations[0]) / "bundled"


@dataclass(frozen=True)
class HostConfig:
    """[[hosts]]: a machine that runs node daemons. address: how the coordinator reaches it;
    ssh: "user@host" for `mesh-up` to start daemons there (None: start them locally)."""

    name: str = setting(rule=NOT_EMPTY)
    address: str = setting("127.0.0.1", NOT_EMPTY)
    ssh: str | None = setting(None, NOT_EMPTY)

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class NodeConfig:
    """[[nodes]]: one node daemon. host: a [[hosts]] name; kind: "cpu" or "gpu";
    capacity_gb: memory it offers to functions; cpus: vCPUs it offers."""

    name: str = setting(rule=NOT_EMPTY)
    host: str = setting("local", NOT_EMPTY)
    kind: Literal["cpu", "gpu"] = "cpu"
    capacity_gb: float = setting(8.0, above(0))
    cpus: float = setting(1.0, above(0))

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class FunctionsConfig:
    """[functions]: how expert function instances are sized, limited and started.

    keep_alive_s:         idle seconds before an instance scales to zero
    keep_alive_policy:    "fixed" (keep_alive_s), "none" (scale to zero after every call), or
                          "histogram": each new instance's keep-alive is the 99th percentile
                          (+10 %) of its function's idle times seen so far (Shahrad et al.'s
                          hybrid histogram, allocator/keepalive.py), keep_alive_s until the
                          histogram is representative; its pre-warm window is not used (an
                          instance stays loaded from its last call)
    gb_per_vcpu:          memory per vCPU of CPU share (1 GB ~ 1 vCPU, as Remoe assumes)
    cfs_period_us:        CFS period of the CPU limit (10 ms slows short calls smoothly where
                          the kernel's 100 ms default stalls them)
    spawn:                "zygote" (fork a warm zygote) or "fresh" (new interpreter)
    start_delay_s:        added to every cold start to mimic a slower platform
    init_cpus:            vCPUs a node's cold starts (fork + INIT) hold at once, each its CPU
                          share (at most 1: INIT is one thread); the others wait their turn,
                          unbilled (nodes/init_gate.py); 0: the node's cpus
    min_memory_gb:        smallest instance; memory_step_gb: sizes are multiples of it
    cgroups:              "auto" (enforce where writable), "off" (account only), "require"
    threads_per_function: torch threads per instance
    max_memory_gb:        largest instance (AWS Lambda: 10 GB)
    cold_start_wait_s:    how long a call waits for a function still cold-starting before the
                          main function computes those experts itself
    cold_start:           what a round does with rows of a function still cold-starting:
                          "wait" for it (up to cold_start_wait_s, gathering the other calls'
                          replies meanwhile), or "load" its experts into the main function on
                          demand (a billed cold start on the critical path, dropped once the
                          function is warm): the batch waits for a weight load, not a process
    """

    keep_alive_s: float = setting(30.0, at_least(0))
    keep_alive_policy: Literal["fixed", "none", "histogram"] = "fixed"
    gb_per_vcpu: float = setting(1.0, above(0))
    cfs_period_us: int = setting(10_000, between(1_000, 1_000_000))
    spawn: Literal["zygote", "fresh"] = "zygote"
    start_delay_s: float = setting(0.0, at_least(0))
    init_cpus: float = setting(0.0, at_least(0))
    min_memory_gb: float = setting(0.125, above(0))
    memory_step_gb: float = setting(0.1, above(0))
    cgroups: Literal["auto", "off", "require"] = "auto"
    threads_per_function: int = setting(1, at_least(1))
    max_memory_gb: float = setting(10.0, above(0))
    cold_start_wait_s: float = setting(30.0, at_least(0))
    cold_start: Literal["wait", "load"] = "wait"

    def __post_init__(self) -> None:
        _validate(self)

    def init_capacity(self, cpus: float) -> float:
        """vCPUs the cold starts of a node of `cpus` vCPUs may hold at once (init_cpus; 0: cpus)."""
        return float(self.init_cpus or cpus)

    def cpu_share(self, memory_gb: float) -> float:
        """vCPUs that an instance of `memory_gb` GB gets."""
        return memory_gb / self.gb_per_vcpu


@dataclass(frozen=True)
class BillingConfig:
    """[billing]: how function time turns into dollars.

    mode:                       "instance" (spawn to stop, keep-alive included: Knative
                                style) or "invocation" (each call, plus init: Lambda style)
    price_cpu_gb_s:             $ per GB-s of a CPU function (AWS Lambda x86 list price)
    price_gpu_gb_s:             $ per GB-s of a GPU function (None: 3 x price_cpu_gb_s)
    price_per_million_requests: $ per million invocations
    bill_init:                  bill cold-start (INIT) time, as AWS does since August 2025
    round_ms:                   billed durations round up to this many ms (0: no rounding)
    serverful_price_per_hour:   $ per hour of the always-on CPU cluster baseline (policy
                                cpu-cluster): AWS EC2 m6a.32xlarge on-demand, Linux, us-east-1
                                (128 vCPU AMD EPYC, 512 GiB: Liu et al.'s 2 x 64-core EPYC, 512 GB)
    """

    mode: Literal["instance", "invocation"] = "instance"
    price_cpu_gb_s: float = setting(AWS_LAMBDA_X86_PRICE_GB_S, at_least(0))
    price_gpu_gb_s: float | None = setting(None, at_least(0))
    price_per_million_requests: float = setting(0.20, at_least(0))
    bill_init: bool = True
    round_ms: int = setting(1, at_least(0))
    serverful_price_per_hour: float = setting(5.5296, above(0))

    def __post_init__(self) -> None:
        _validate(self)
        if self.price_gpu_gb_s is None:
            object.__setattr__(self, "price_gpu_gb_s", GPU_PRICE_RATIO * self.price_cpu_gb_s)


@dataclass(frozen=True)
class SloClass:
    """[slo.classes.<name>]: targets a request of this class must meet: time to first token
    and mean time per output token, in seconds."""

    ttft_s: float = setting(rule=above(0))
    tpot_s: float = setting(rule=above(0))

    def __post_init__(self) -> None:
        _validate(self)


def _default_slo_classes() -> dict[str, SloClass]:
    # For the bundled tiny model on a CPU: a chat-like class and a throughput class.
    return {
        "interactive": SloClass(ttft_s=2.0, tpot_s=0.2),
        "batch": SloClass(ttft_s=30.0, tpot_s=2.0),
    }


@dataclass(frozen=True)
class SloConfig:
    """[slo]: default_class names the class of requests that ask for "default"."""

    default_class: str = setting("interactive", NOT_EMPTY)
    classes: Mapping[str, SloClass] = setting(factory=_default_slo_classes)

    def __post_init__(self) -> None:
        _validate(self)
        if RESERVED_SLO_CLASS in self.classes:
            raise ConfigError(
                f'"{RESERVED_SLO_CLASS}" is reserved (requests use it to mean default_class); rename the class',
                key=f"classes.{RESERVED_SLO_CLASS}",
            )
        if self.default_class not in self.classes:
            raise ConfigError(
                f"no class {_show(self.default_class)}; classes are: {', '.join(self.classes) or 'none'}",
                key="default_class",
            )

    def resolve(self, name: str) -> str:
        """The class a request asking for `name` gets ("default" -> default_class).

        Raises RequestRejected (code "unknown_slo_class") for a class not in the config.
        """
        if name == RESERVED_SLO_CLASS:
            return self.default_class
        if name not in self.classes:
            raise RequestRejected(
                f"unknown SLO class {name!r}",
                code="unknown_slo_class",
                hint=f"use one of {', '.join(self.classes)} or define it under [slo.classes] in launch.toml",
            )
        return name


@dataclass(frozen=True)
class PolicyConfig:
    """[policy]: which experts go remote and how calls to them behave.

    name:               a policy of KNOWN_POLICIES ("all-local", "all-remote", "static-split", ...)
    remote:             static-split: the [layer, expert] pairs served remotely
    micro_batch_tokens: tokens per scatter call within a layer (0 = no split below the cap)
    payload_cap_bytes:  largest activation payload per call (AWS Lambda's 6 MiB sync cap)
    shm_min_bytes:      a call's rows of at least this many bytes go to a worker on this host
                        through shared memory, only a descriptor over ZeroMQ (mesh/shm.py; the
                        default is the crossover `python -m mesh.bench_shm` measured); 0 = never
    call_timeout_s:     a remote call unanswered after this is retried or recomputed locally
    retries:            retries of a failed or late call before recomputing it locally
    replan_every:       re-plan after this many requests (0 = plan once at start-up)
    function_memory_gb: all-remote / static-split: memory of every function (0 = the policy's own)
    function_replicas:  all-remote / static-split: warm instances of every function; a round's
                        rows are split evenly across them
    profiles:           "auto": measure this host's profiles on first use (`moemesh profile`,
                        cached in profiles/<host>/<model>.json); "measured": require them;
                        "synthetic": plan from built-in numbers (tests, quick looks)
    meter_guard:        moemesh: plan all-local once the meter shows its plans costing more
                        than the all-local baseline for the same traffic
    replan_if_it_pays:  moemesh: skip a due re-plan when the most it could save on the request
                        is less than what planning costs in the main function
                        (planning.replan_skip_reason)
    """

    name: str = setting("moemesh", NOT_EMPTY)
    remote: tuple[tuple[int, int], ...] = setting((), at_least(0))
    micro_batch_tokens: int = setting(0, at_least(0))
    payload_cap_bytes: int = setting(6 * 1024 * 1024, above(0))
    shm_min_bytes: int = setting(64 * 1024, at_least(0))
    call_timeout_s: float = setting(5.0, above(0))
    retries: int = setting(1, at_least(0))
    replan_every: int = setting(8, at_least(0))
    function_memory_gb: float = setting(0.25, at_least(0))
    function_replicas: int = setting(1, at_least(1))
    profiles: Literal["auto", "measured", "synthetic"] = "auto"
    meter_guard: bool = True
    replan_if_it_pays: bool = True

    def __post_init__(self) -> None:
        _validate(self)
        if self.name not in KNOWN_POLICIES:
            close = difflib.get_close_matches(self.name, KNOWN_POLICIES, n=1)
            tip = f'did you mean "{close[0]}"? ' if close else ""
            raise ConfigError(
                f"unknown policy {_show(self.name)}; {tip}known: {', '.join(KNOWN_POLICIES)}",
                key="name",
            )
        if len(set(self.remote)) != len(self.remote):
            raise ConfigError("an expert is listed twice", key="remote")


@dataclass(frozen=True)
class MeterConfig:
    """[meter]: record_dir: folder for per-request JSON records (None: keep none);
    straggler_k: a function reply later than k x its round's median is flagged."""

    record_dir: str | None = setting(None, NOT_EMPTY)
    straggler_k: float = setting(3.0, at_least(1))

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class PredictorConfig:
    """[predictor]: what forecasts a request's expert activations for the policy.
    name:         "moving-average", "recent-use", "sps", "bayes", "layer-aware" or "oracle"
                  (the true activations of the prompts in `traces`; for the oracle policy)
    traces:       a trace store (moemesh trace) the predictor learns from at start-up (None: cold)
    record_dir:   append every served request's activation trace to this store (None: don't)"""

    name: Literal["moving-average", "recent-use", "sps", "bayes", "layer-aware", "oracle"] = "sps"
    traces: str | None = setting(None, NOT_EMPTY)
    record_dir: str | None = setting(None, NOT_EMPTY)

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: CURVE encryption and ZAP authentication of the mesh's sockets (mesh/security.py).

    curve:           "auto": CURVE on every socket bound off loopback and on the sockets that
                     dial one; "on": on every socket; "off": on none
    keys_dir:        folder of the key files `moemesh keys` writes (NAME.public, NAME.secret);
                     relative to launch.toml; None: no keys (then only loopback binds work)
    coordinator_key: the key pair the coordinator serves with (clients need its NAME.public)
    client_keys:     public keys (names in keys_dir) allowed on the client and metrics ports
    host_keys:       [[hosts]] name -> the key pair its daemons and workers use (a host not
                     listed uses the pair named after it); the control port allows exactly these
    allow_insecure_off_loopback: bind off loopback without CURVE all the same (a network you
                     trust); otherwise such a bind is refused with a ConfigError
    """

    curve: Literal["auto", "on", "off"] = "auto"
    keys_dir: str | None = setting(None, NOT_EMPTY)
    coordinator_key: str = setting("coordinator", NOT_EMPTY)
    client_keys: tuple[str, ...] = setting(("client",), NOT_EMPTY)
    host_keys: Mapping[str, str] = setting(factory=dict)
    allow_insecure_off_loopback: bool = False

    def __post_init__(self) -> None:
        _validate(self)
        for host, name in self.host_keys.items():
            if not name:
                raise ConfigError("expected a key name, got \"\"", key=f"host_keys.{host}")

    def host_key(self, host: str) -> str:
        """The key pair name of [[hosts]] entry `host`."""
        return self.host_keys.get(host, host)


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the OpenAI-compatible HTTP front end (mesh/http/), a client of the mesh that
    `mesh-up` starts once the coordinator is ready.

    enabled:                 start it with `mesh-up`
    host:                    address it binds
    port:                    its port; None: 8000 (vLLM's), or a free port when
                             coordinator.client_port is 0 (see `resolved_port`); 0 = a free port
    model_name:              the model id it serves (/v1/models, the "model" field); None:
                             the checkpoint folder's name ("moemesh-bundled" for the bundled one)
    max_concurrent_requests: requests in flight through it; beyond, it answers 429
    """

    enabled: bool = True
    host: str = setting("127.0.0.1", NOT_EMPTY)
    port: int | None = setting(None, PORT)
    model_name: str | None = setting(None, NOT_EMPTY)
    max_concurrent_requests: int = setting(64, at_least(1))

    def __post_init__(self) -> None:
        _validate(self)

    def resolved_port(self, coordinator: CoordinatorConfig) -> int:
        """port, or when absent: 8000, or 0 (a free port) when the coordinator's are free ones."""
        if self.port is not None:
            return self.port
        return 8000 if coordinator.client_port else 0

    def resolved_model_name(self, model: ModelConfig) -> str:
        if self.model_name is not None:
            return self.model_name
        return "moemesh-bundled" if model.path == BUNDLED_MODEL else Path(model.path).name


# ------------------------------------------------------------------------------- the whole


@dataclass(frozen=True)
class Addresses:
    """The coordinator's endpoints ("tcp://host:port"; port 0 = bind any and read it back)."""

    client: str
    control: str
    metrics: str

    def __post_init__(self) -> None:
        for name in ("client", "control", "metrics"):
            endpoint = getattr(self, name)
            if not isinstance(endpoint, str) or not re.fullmatch(
                r"tcp://.+:\d+|ipc://.+|inproc://.+", endpoint
            ):
                raise ConfigError(
                    f"expected an endpoint like tcp://127.0.0.1:7555, got {_show(endpoint)}",
                    key=f"addresses.{name}",
                )

    @classmethod
    def from_coordinator(cls, coordinator: CoordinatorConfig) -> Addresses:
        host = f"[{coordinator.host}]" if ":" in coordinator.host else coordinator.host  # IPv6
        return cls(
            client=f"tcp://{host}:{coordinator.client_port}",
            control=f"tcp://{host}:{coordinator.control_port}",
            metrics=f"tcp://{host}:{coordinator.metrics_port}",
        )


def _default_hosts() -> tuple[HostConfig, ...]:
    return (HostConfig(name="local"),)


def _default_nodes() -> tuple[NodeConfig, ...]:
    return (NodeConfig(name="cpu0"), NodeConfig(name="cpu1"))


@dataclass(frozen=True)
class MeshConfig:
    """The whole launch.toml. Defaults are the shipped launch.toml: everything on this machine,
    two CPU node daemons, the bundled model, instance billing, policy all-remote."""

    coordinator: CoordinatorConfig = setting(factory=CoordinatorConfig)
    model: ModelConfig = setting(factory=ModelConfig)
    hosts: tuple[HostConfig, ...] = setting(factory=_default_hosts)
    nodes: tuple[NodeConfig, ...] = setting(factory=_default_nodes)
    functions: FunctionsConfig = setting(factory=FunctionsConfig)
    billing: BillingConfig = setting(factory=BillingConfig)
    slo: SloConfig = setting(factory=SloConfig)
    policy: PolicyConfig = setting(factory=PolicyConfig)
    meter: MeterConfig = setting(factory=MeterConfig)
    predictor: PredictorConfig = setting(factory=PredictorConfig)
    security: SecurityConfig = setting(factory=SecurityConfig)
    http: HttpConfig = setting(factory=HttpConfig)

    def __post_init__(self) -> None:
        _validate(self)
        for section in ("hosts", "nodes"):
            seen: set[str] = set()
            for i, entry in enumerate(getattr(self, section)):
                if entry.name in seen:
                    raise ConfigError(
                        f"{_show(entry.name)} is used twice; names must be unique",
                        key=f"{section}[{i}].name",
                    )
                seen.add(entry.name)
        hosts = [h.name for h in self.hosts]
        for i, node in enumerate(self.nodes):
            if node.host not in hosts:
                raise ConfigError(
                    f"no host {_show(node.host)}; [[hosts]] names are: {', '.join(hosts) or 'none'}",
                    key=f"nodes[{i}].host",
                )
        for host in self.security.host_keys:
            if host not in hosts:
                raise ConfigError(
                    f"no host {_show(host)}; [[hosts]] names are: {', '.join(hosts) or 'none'}",
                    key=f"security.host_keys.{host}",
                )

    @property
    def addresses(self) -> Addresses:
        return Addresses.from_coordinator(self.coordinator)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars: send with msgpack or JSON, rebuild with from_dict."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> MeshConfig:
        """Build and validate from `to_dict()` output or a parsed TOML document."""
        try:
            return _build(cls, data)
        except ConfigError as exc:
            raise exc.in_file(source) from None


# ------------------------------------------------------------------------------- loading

PATH_KEYS = (("model", "path"), ("meter", "record_dir"), ("security", "keys_dir"))  # relative paths resolve against the file


def load_config(
    path: str | Path | None, overrides: Mapping[str, object] | None = None
) -> MeshConfig:
    """Read launch.toml at `path` (None: the built-in defaults), apply `overrides`, validate.

    overrides: dotted keys to values, e.g. {"coordinator.client_port": 0, "nodes[1].cpus": 2.0};
    they may set keys the file leaves out. Relative model.path / meter.record_dir resolve
    against the file's folder (against the working directory when given as overrides).
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_toml(Path(path))
        _resolve_paths(raw, Path(path).resolve().parent)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        try:
            _apply_override(raw, key, value)
        except ConfigError as exc:
            raise exc.in_file("override") from None
    try:
        return _build(MeshConfig, raw)
    except ConfigError as exc:
        from_override = exc.key is not None and any(_related(exc.key, key) for key in overrides)
        raise exc.in_file("override" if from_override else source) from None


def _related(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` are the same or one lies under the other."""
    return a == b or a.startswith((f"{b}.", f"{b}[")) or b.startswith((f"{a}.", f"{a}["))


def parse_override(text: str) -> tuple[str, object]:
    """ "key=value" from a command line -> (key, value). The value is read as a TOML value
    (5555, 2.5, true, "x", [[0, 1]]) and, failing that, kept as a plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {_show(text)}", path="override")
    try:
        return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            "no such file",
            path=str(path),
            hint="pass --config PATH, or copy launch.toml from the repository root",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for section, key in PATH_KEYS:
        table = raw.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if (
            isinstance(value, str)
            and value
            and value != BUNDLED_MODEL
            and not Path(value).is_absolute()
        ):
            table[key] = str(base / value)  # type: ignore[index]


_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)(?:\[(\d+)\])?")


def _apply_override(raw: dict[str, Any], key: str, value: object) -> None:
    """Set dotted `key` ("a.b", "nodes[1].cpus") in the raw TOML tree, creating tables."""
    parts = key.split(".")
    if not all(_SEGMENT.fullmatch(p) for p in parts):
        raise ConfigError(
            "expected a dotted key like coordinator.client_port or nodes[1].cpus", key=key
        )
    if (parts[0], parts[-1]) in PATH_KEYS and len(parts) == 2 and isinstance(value, str):
        if value != BUNDLED_MODEL and value and not Path(value).is_absolute():
            value = str(Path.cwd() / value)
    table: Any = raw
    for depth, part in enumerate(parts):
        name, index = _SEGMENT.fullmatch(part).groups()  # type: ignore[union-attr]
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if index is None:
            if last:
                table[name] = value
            else:
                table = table.setdefault(name, {})
                if not isinstance(table, dict):
                    raise ConfigError("is not a table; cannot set keys under it", key=where)
            continue
        entries = table.get(name)
        if entries is None and depth == 0 and name in ("hosts", "nodes"):
            entries = table[name] = MeshConfig().to_dict()[name]  # start from the default list
        if not isinstance(entries, list) or int(index) >= len(entries):
            count = len(entries) if isinstance(entries, list) else 0
            raise ConfigError(f"no such entry ({name} has {count})", key=where)
        if last:
            entries[int(index)] = value
        else:
            table = entries[int(index)]
            if not isinstance(table, dict):
                raise ConfigError("is not a table; cannot set keys under it", key=where)


def resolve_model_path(path: str) -> Path:
    """A `[model] path` value ("bundled", a folder) as the folder it names."""
    return ModelConfig(path=path or "bundled").resolved_path()
