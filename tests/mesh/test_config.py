"""mesh.config: the shipped launch.toml loads, overrides apply, every error names its key and
file, typos get a suggestion, and the config survives to_dict / from_dict (JSON, msgpack)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import msgpack
import pytest

from mesh import config as config_module
from mesh.config import (
    AWS_LAMBDA_X86_PRICE_GB_S,
    Addresses,
    CoordinatorConfig,
    MeshConfig,
    NodeConfig,
    SloClass,
    load_config,
    parse_override,
    register_policy,
)
from mesh.errors import ConfigError, RequestRejected

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TOML = REPO / "launch.toml"


@pytest.fixture
def write_toml(tmp_path: Path):
    """Write a launch.toml in a temporary folder and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "launch.toml"
        path.write_text(text)
        return path

    return write


# ------------------------------------------------------------------------------ defaults


def test_shipped_launch_toml_loads_and_equals_the_built_in_defaults() -> None:
    cfg = load_config(LAUNCH_TOML)
    assert cfg == load_config(None) == MeshConfig()
    assert [n.name for n in cfg.nodes] == ["cpu0", "cpu1"]
    assert {n.host for n in cfg.nodes} == {"local"} and cfg.hosts[0].address == "127.0.0.1"
    assert cfg.model.path == "bundled"
    assert cfg.policy.name == "moemesh"
    assert cfg.billing.mode == "instance"
    assert cfg.billing.price_cpu_gb_s == AWS_LAMBDA_X86_PRICE_GB_S
    assert cfg.billing.price_gpu_gb_s == pytest.approx(3 * AWS_LAMBDA_X86_PRICE_GB_S)
    assert cfg.policy.payload_cap_bytes == 6 * 1024 * 1024
    assert cfg.slo.classes["interactive"] == SloClass(ttft_s=2.0, tpot_s=0.2)


def test_every_key_of_launch_toml_has_a_comment() -> None:
    for number, line in enumerate(LAUNCH_TOML.read_text().splitlines(), 1):
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"launch.toml:{number} has no comment: {line!r}"


def test_addresses() -> None:
    cfg = load_config(None, {"coordinator.host": "10.0.0.5", "coordinator.metrics_port": 0})
    assert cfg.addresses == Addresses(
        client="tcp://10.0.0.5:7555", control="tcp://10.0.0.5:7556", metrics="tcp://10.0.0.5:0"
    )
    assert Addresses.from_coordinator(CoordinatorConfig(host="::1")).client == "tcp://[::1]:7555"
    with pytest.raises(ConfigError, match="addresses.metrics: expected an endpoint"):
        Addresses(client="tcp://a:1", control="tcp://a:2", metrics="127.0.0.1:3")


def test_bundled_model_path_resolves_into_the_package() -> None:
    assert MeshConfig().model.resolved_path() == REPO / "nodes" / "bundled"


def test_helpers() -> None:
    cfg = MeshConfig()
    assert cfg.functions.cpu_share(0.5) == 0.5
    assert cfg.slo.resolve("default") == "interactive"
    assert cfg.slo.resolve("batch") == "batch"
    with pytest.raises(RequestRejected, match="unknown SLO class 'gold'") as info:
        cfg.slo.resolve("gold")
    assert info.value.code == "unknown_slo_class" and "interactive" in info.value.hint


# ----------------------------------------------------------------------------- overrides


def test_overrides_replace_file_values() -> None:
    cfg = load_config(
        LAUNCH_TOML,
        {
            "coordinator.client_port": 5555,
            "nodes[1].cpus": 2,
            "policy.name": "static-split",
            "policy.remote": [[0, 1], [1, 3]],
            "slo.classes.batch.tpot_s": 5,
        },
    )
    assert cfg.coordinator.client_port == 5555
    assert cfg.nodes[1].cpus == 2.0 and isinstance(cfg.nodes[1].cpus, float)
    assert cfg.policy.remote == ((0, 1), (1, 3))
    assert cfg.slo.classes["batch"].tpot_s == 5.0
    assert cfg.nodes[0] == MeshConfig().nodes[0]  # untouched


def test_overrides_work_without_a_file() -> None:
    cfg = load_config(None, {"nodes[0].capacity_gb": 4.0, "meter.record_dir": "records"})
    assert cfg.nodes[0].capacity_gb == 4.0
    assert cfg.meter.record_dir == str(Path.cwd() / "records")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("coordinator.client_port=5555", ("coordinator.client_port", 5555)),
        ("functions.keep_alive_s = 2.5", ("functions.keep_alive_s", 2.5)),
        ("billing.bill_init=false", ("billing.bill_init", False)),
        ("model.path=/models/olmoe", ("model.path", "/models/olmoe")),
        ('model.path="bundled"', ("model.path", "bundled")),
        ("policy.remote=[[0, 1]]", ("policy.remote", [[0, 1]])),
    ],
)
def test_parse_override(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


def test_parse_override_needs_key_and_value() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("coordinator.client_port")


def test_bad_override_key() -> None:
    with pytest.raises(ConfigError, match=r"override: nodes\[7\]: no such entry \(nodes has 2\)"):
        load_config(None, {"nodes[7].cpus": 1.0})
    with pytest.raises(ConfigError, match="override: coordinator..port: expected a dotted key"):
        load_config(None, {"coordinator..port": 1})
    with pytest.raises(ConfigError, match="override: model.path: is not a table"):
        load_config(LAUNCH_TOML, {"model.path.x": 1})


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[nodes]]\nname = "a"\n[[nodes]]\nname = "b"\ncapacity_gb = "abc"\n',
            'nodes[1].capacity_gb: expected a number > 0, got "abc"',
        ),
        (
            "[coordinator]\nclient_port = 70000\n",
            "coordinator.client_port: expected an integer from 0 to 65535",
        ),
        (
            "[coordinator]\nmax_batch = 0\n",
            "coordinator.max_batch: expected an integer >= 1, got 0",
        ),
        (
            "[coordinator]\nmax_batch = 2.5\n",
            "coordinator.max_batch: expected an integer >= 1, got 2.5",
        ),
        (
            '[coordinator]\ndevice = "tpu"\n',
            'coordinator.device: expected one of "cpu", "cuda", "auto", got "tpu"',
        ),
        (
            '[coordinator]\nhost = ""\n',
            'coordinator.host: expected a string that is not empty, got ""',
        ),
        (
            "[coordinator]\ncontrol_port = 7555\n",
            "coordinator.control_port: port 7555 is also client_port",
        ),
        ("[billing]\nbill_init = 1\n", "billing.bill_init: expected true or false, got 1"),
        (
            "[billing]\nprice_cpu_gb_s = -1.0\n",
            "billing.price_cpu_gb_s: expected a number >= 0, got -1.0",
        ),
        (
            "[functions]\ncfs_period_us = 100\n",
            "functions.cfs_period_us: expected an integer from 1000 to 1000000",
        ),
        (
            '[functions]\ncgroups = "yes"\n',
            'functions.cgroups: expected one of "auto", "off", "require"',
        ),
        (
            "[policy]\nremote = [[0, 1, 2]]\n",
            "policy.remote[0]: expected an array of 2 items, got [0, 1, 2]",
        ),
        ("[policy]\nremote = [[0, 1], [0, 1]]\n", "policy.remote: an expert is listed twice"),
        ('[policy]\nname = "greedy"\n', 'policy.name: unknown policy "greedy"; known: all-local'),
        (
            "[slo.classes.gold]\nttft_s = 1.0\n",
            "slo.classes.gold.tpot_s: missing; this key is required",
        ),
        (
            "[slo.classes.gold]\nttft_s = 0\ntpot_s = 1\n",
            "slo.classes.gold.ttft_s: expected a number > 0, got 0",
        ),
        (
            "[slo.classes.default]\nttft_s = 1\ntpot_s = 1\n",
            'slo.classes.default: "default" is reserved',
        ),
        (
            '[slo]\ndefault_class = "gold"\n',
            'slo.default_class: no class "gold"; classes are: interactive, batch',
        ),
        (
            '[[nodes]]\nname = "a"\nhost = "far"\n',
            'nodes[0].host: no host "far"; [[hosts]] names are: local',
        ),
        ('[[nodes]]\nname = "a"\n[[nodes]]\nname = "a"\n', 'nodes[1].name: "a" is used twice'),
        ("[[nodes]]\ncpus = 1.0\n", "nodes[0].name: missing; this key is required"),
        (
            '[[hosts]]\nname = "h"\nssh = ""\n',
            'hosts[0].ssh: expected a string that is not empty, got ""',
        ),
        ('model = "bundled"\n', 'model: expected a table, got "bundled"'),
        ('nodes = "cpu0"\n', 'nodes: expected an array, got "cpu0"'),
    ],
)
def test_validation_error_names_the_file_and_key(write_toml, toml: str, message: str) -> None:
    path = write_toml(toml)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == str(path) and info.value.code == "config_error"


@pytest.mark.parametrize(
    ("toml", "key", "suggestion"),
    [
        ("[functions]\nkeep_alive = 3\n", "functions.keep_alive", "keep_alive_s"),
        ("[coordinator]\nclient_prot = 1\n", "coordinator.client_prot", "client_port"),
        ("[functons]\nspawn = 'fresh'\n", "functons", "functions"),
        ('[[nodes]]\nname = "a"\ncapcity_gb = 1.0\n', "nodes[0].capcity_gb", "capacity_gb"),
        ("[slo.classes.batch]\nttft = 1.0\ntpot_s = 1.0\n", "slo.classes.batch.ttft", "ttft_s"),
    ],
)
def test_unknown_key_suggests_the_right_one(
    write_toml, toml: str, key: str, suggestion: str
) -> None:
    with pytest.raises(ConfigError, match=rf'unknown key; did you mean "{suggestion}"\?') as info:
        load_config(write_toml(toml))
    assert info.value.key == key


def test_unknown_key_without_a_close_match_lists_the_known_ones(write_toml) -> None:
    with pytest.raises(ConfigError, match="unknown key; known keys: path, dtype"):
        load_config(write_toml("[model]\nzzz = 1\n"))


def test_errors_from_overrides_name_the_override() -> None:
    with pytest.raises(
        ConfigError, match=r'^override: nodes\[1\].capacity_gb: expected a number > 0, got "abc"'
    ):
        load_config(LAUNCH_TOML, {"nodes[1].capacity_gb": "abc"})
    with pytest.raises(
        ConfigError, match=r'^override: functons: unknown key; did you mean "functions"'
    ):
        load_config(LAUNCH_TOML, {"functons.spawn": "fresh"})


def test_missing_file_and_bad_toml(tmp_path: Path, write_toml) -> None:
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config(tmp_path / "nope.toml")
    assert "--config" in info.value.hint
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write_toml("[coordinator\n"))


def test_relative_paths_resolve_against_the_file(write_toml) -> None:
    path = write_toml('[model]\npath = "models/tiny"\n[meter]\nrecord_dir = "records"\n')
    cfg = load_config(path)
    assert cfg.model.path == str(path.parent / "models" / "tiny")
    assert cfg.meter.record_dir == str(path.parent / "records")
    assert load_config(write_toml('[model]\npath = "/abs/model"\n')).model.path == "/abs/model"


def test_sections_validate_when_built_in_code() -> None:
    with pytest.raises(ConfigError, match="capacity_gb: expected a number > 0, got -1"):
        NodeConfig(name="n", capacity_gb=-1)
    node = NodeConfig(name="n", capacity_gb=3)
    assert isinstance(node.capacity_gb, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.cpus = 4.0  # type: ignore[misc]


def test_register_policy_extends_the_known_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "KNOWN_POLICIES", config_module.KNOWN_POLICIES)
    with pytest.raises(ConfigError, match="unknown policy"):
        load_config(None, {"policy.name": "my-planner"})
    register_policy("my-planner")
    assert load_config(None, {"policy.name": "my-planner"}).policy.name == "my-planner"


# ------------------------------------------------------------------------ to_dict / from_dict


def test_to_dict_from_dict_round_trip_through_json_and_msgpack() -> None:
    cfg = load_config(
        LAUNCH_TOML,
        {
            "policy.name": "static-split",
            "policy.remote": [[0, 1]],
            "hosts": [{"name": "local"}, {"name": "far", "address": "10.0.0.2", "ssh": "me@far"}],
            "nodes[1].host": "far",
            "meter.record_dir": "/tmp/records",
        },
    )
    data = cfg.to_dict()
    assert MeshConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert MeshConfig.from_dict(msgpack.unpackb(msgpack.packb(data))) == cfg
    assert data["policy"]["remote"] == [[0, 1]]
    assert data["slo"]["classes"]["batch"] == {"ttft_s": 30.0, "tpot_s": 2.0}


def test_from_dict_validates_like_a_file() -> None:
    data = MeshConfig().to_dict()
    data["functions"]["threads"] = 2
    with pytest.raises(
        ConfigError,
        match=r'^<dict>: functions.threads: unknown key; did you mean "threads_per_function"',
    ):
        MeshConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"^worker-3: coordinator.max_batch"):
        MeshConfig.from_dict({"coordinator": {"max_batch": -1}}, source="worker-3")
