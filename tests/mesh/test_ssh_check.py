"""`mesh-up --check` on the CURVE keys of ssh hosts, and the $MOEMESH_SSH_CONFIG hook (units:
the probe runs here with `sh -c`, as a remote login shell would run it; ssh itself is faked)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from mesh.config import HostConfig, MeshConfig
from mesh.launcher import (
    check,
    host_key_files,
    local_version,
    ssh_command,
    ssh_daemon_argv,
    ssh_probe_argv,
)
from mesh.security import make_keys
from tests.mesh.conftest import mesh_config


def test_the_probe_names_missing_and_world_readable_key_files(tiny_model, tmp_path):
    make_keys(tmp_path, "far")
    make_keys(tmp_path, "coordinator")
    (tmp_path / "far.secret").chmod(0o644)
    files = (str(tmp_path / "far.secret"), str(tmp_path / "far.public"), str(tmp_path / "nowhere.public"))
    probe = ssh_probe_argv(HostConfig(name="far", ssh="me@far"), sys.executable, str(tiny_model), files)[-1]
    said = subprocess.run(["sh", "-c", probe], capture_output=True, timeout=60, check=True).stdout.decode().splitlines()
    assert said[:2] == [local_version(), "True"]
    assert json.loads(said[2]) == [f"{files[0]}: readable by others (chmod 600 it)", f"{files[2]}: missing"]


def test_check_asks_each_ssh_host_for_its_own_pair_and_the_coordinators_public_key(tiny_model, tmp_path):
    keys = tmp_path / "keys"
    for name in ("coordinator", "client", "a", "b"):
        make_keys(keys, name)
    base = mesh_config(tiny_model, **{"security.keys_dir": str(keys), "coordinator.host": "10.0.0.1"}).to_dict()
    hosts = [{"name": "a", "address": "10.0.0.2", "ssh": "me@a"}, {"name": "b", "address": "10.0.0.3", "ssh": "me@b"}]
    config = MeshConfig.from_dict(base | {"hosts": hosts, "nodes": [{"name": "na", "host": "a"}, {"name": "nb", "host": "b"}]})
    assert host_key_files(config, config.hosts[0]) == tuple(str(keys / f) for f in ("a.secret", "a.public", "coordinator.public"))
    asked = {}

    def fake_run(argv, **_):
        host = argv[-2]
        asked[host] = shlex.split(argv[-1])[4:]  # python -c CODE MODEL then the key files
        bad = [] if host == "me@a" else [f"{keys}/b.secret: missing"]
        return subprocess.CompletedProcess(argv, 0, f"{local_version()}\nTrue\n{json.dumps(bad)}\n".encode(), b"")

    problems = check(config, run=fake_run)
    assert asked["me@b"] == [str(keys / f) for f in ("b.secret", "b.public", "coordinator.public")]
    assert problems == [f"[[hosts]] b: key file {keys}/b.secret: missing on that host; each ssh host needs its "
                        "own pair and the coordinator's .public at the same security.keys_dir path (moemesh keys)"]
    (keys / "a.secret").unlink()  # missing here too: [security] says so, from this machine's keys
    assert any(p.startswith("[security]") and "a.secret" in p for p in check(config, run=fake_run))


def test_moemesh_ssh_config_adds_an_ssh_config_file(monkeypatch):
    monkeypatch.delenv("MOEMESH_SSH_CONFIG", raising=False)
    assert "-F" not in ssh_command()
    monkeypatch.setenv("MOEMESH_SSH_CONFIG", "/etc/moemesh/ssh_config")
    argv = ssh_daemon_argv(HostConfig(name="far", ssh="me@far"), "n0", "tcp://10.0.0.1:1", "{}")
    assert argv[:3] == ["ssh", "-F", "/etc/moemesh/ssh_config"] and argv[-2] == "me@far"
    assert ssh_probe_argv(HostConfig(name="far", ssh="me@far"))[:3] == argv[:3]
