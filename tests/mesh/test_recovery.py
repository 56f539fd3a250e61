"""Recovery with real processes: a hung worker retired within 3 s with its request's tokens
intact, a node daemon killed under load, ghosts stopped after a re-register, and `mesh-up`
restarting a killed daemon and serving on. Every wait polls the mesh's status until a
condition holds (generous deadlines); no test sleeps and hopes."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

from allocator.plan import FunctionSpec, MainSpec, Plan
from mesh.client import MeshClient, SyncMeshClient
from mesh.config import HostConfig, MeshConfig, load_config
from mesh.coordinator import Coordinator
from mesh.coordinator import Node as CoordinatorNode
from mesh.errors import MeshError
from mesh.functions import Registry, State
from mesh.launcher import (
    MAX_RESTARTS,
    Mesh,
    _pump,
    check,
    local_version,
    ssh_daemon_argv,
    ssh_probe_argv,
)
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from tests.mesh.conftest import (
    PROMPTS,
    dump,
    mesh_config,
    mesh_up_address,
    running_mesh,
    sigterm_leaves_nothing,
)
from tests.mesh.test_client_and_launcher import _to_toml
from tests.mesh.test_mesh_e2e import generate_all, status

LONG = 40
DETECT_WITHIN_S = 3.0
FAST = {"coordinator.heartbeat_s": 0.5, "coordinator.liveness": 2}  # a node is dead after 1 s of silence


def wait_until(predicate, what: str, timeout_s: float = 60.0):
    """Poll `predicate` until it returns something truthy (and return it), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.1)  # the polling period


def st(mesh: Mesh) -> dict:
    return asyncio.run(status(mesh.endpoints["client"]))


def expected_tokens(model_path, prompts, n=LONG):
    return Engine(Checkpoint(model_path).load_model()).complete(prompts, SamplingParams(max_new_tokens=n, stop_at_eos=False))


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _mid_generation(address: str, prompts, fault):
    """Start `prompts`, take 3 tokens of each, call `fault(status)`, then finish every stream:
    per prompt its tokens, or the typed MeshError it ended with."""
    async with MeshClient(address, timeout_s=60) as client:
        gens = [client.generate("", prompt_ids=p, max_new_tokens=LONG, stop_at_eos=False) for p in prompts]
        streams = [g.__aiter__() for g in gens]
        got = [[(await s.__anext__()).token_id for _ in range(3)] for s in streams]
        info = fault(await client.status())
        out = []
        for tokens, stream in zip(got, streams, strict=True):
            try:
                tokens += [t.token_id async for t in stream]
                out.append(tokens)
            except MeshError as exc:
                out.append(exc)
        return out, info


def test_sigstopped_worker_is_retired_within_3s_and_its_request_completes(tiny_model, tmp_path):
    expected = expected_tokens(tiny_model, PROMPTS[:2])
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote"}) as mesh:
        def freeze(status):
            victim = max((i for i in status["instances"] if i["state"] == "warm"), key=lambda i: i["invocations"])
            at = time.time()
            os.kill(victim["pid"], signal.SIGSTOP)
            return victim, at

        try:
            got, (victim, frozen_at) = asyncio.run(_mid_generation(mesh.endpoints["client"], PROMPTS[:2], freeze))
            assert got == expected, dump(mesh)
            death = wait_until(lambda: next((d for d in st(mesh)["deaths"]
                                             if d["instance_id"] == victim["instance_id"]), None),
                               f"the death of hung {victim['instance_id']}")
        finally:
            if not dead(victim["pid"]):
                os.kill(victim["pid"], signal.SIGCONT)
        detected_s = death["time"] - frozen_at
        print(f"\nSIGSTOPped worker {victim['instance_id']} retired {detected_s:.2f} s after SIGSTOP")
        assert detected_s < DETECT_WITHIN_S, dump(mesh)
        wait_until(lambda: dead(victim["pid"]), "the hung worker killed")
        again = asyncio.run(generate_all(mesh.endpoints["client"], PROMPTS[:1], LONG))  # re-spawned, serving
        assert again[0][0] == expected[0]


def test_kill_9_of_a_node_daemon_the_mesh_serves_on_the_other(tiny_model, tmp_path):
    prompts = PROMPTS[:3]
    expected = expected_tokens(tiny_model, prompts)
    base = mesh_config(tiny_model, **{"policy.name": "all-remote", **FAST}).to_dict()
    config = load_config(None, {})  # the default launch config's two nodes, cpu0 and cpu1
    two = base | {"nodes": config.to_dict()["nodes"]}
    config = config.__class__.from_dict(two)
    with Mesh(config, log_dir=tmp_path / "logs", run_dir=tmp_path / "run") as mesh:
        mesh.start(timeout_s=180)
        address = mesh.endpoints["client"]
        warmed = asyncio.run(generate_all(address, prompts[:1], 4))  # every function warm somewhere
        assert warmed[0][0] == expected[0][:4]

        def kill_busiest_node(status):
            on = {}
            for inst in status["instances"]:
                if inst["state"] == "warm":
                    on.setdefault(inst["node"], []).append(inst)
            victim = max(on, key=lambda n: len(on[n]))
            pid = mesh.daemons[victim].pid
            at = time.time()
            os.kill(pid, signal.SIGKILL)
            return victim, at, [i["instance_id"] for i in on[victim]]

        got, (victim, killed_at, lost) = asyncio.run(_mid_generation(address, prompts, kill_busiest_node))
        for tokens, want in zip(got, expected, strict=True):  # each: the right tokens, or a typed error
            assert tokens == want or isinstance(tokens, MeshError), (tokens, dump(mesh))
        assert sum(t == w for t, w in zip(got, expected, strict=True)) >= 2, got
        survivor = next(n.name for n in config.nodes if n.name != victim)
        status_now = wait_until(lambda: (s := st(mesh)) and not next(n for n in s["nodes"] if n["name"] == victim)["alive"]
                                and s, f"node {victim} marked dead")
        deaths = [d["time"] for d in status_now["deaths"] if d["instance_id"] in lost]
        assert deaths, status_now["deaths"]
        print(f"\nnode {victim} killed -9: its instances retired {min(deaths) - killed_at:.2f} s later")
        assert min(deaths) - killed_at < DETECT_WITHIN_S, dump(mesh)
        states = {i["instance_id"]: i["state"] for i in status_now["instances"]}
        assert all(states[i] in ("failed", "stopped") for i in lost), states
        again = asyncio.run(generate_all(address, prompts[:2], LONG))
        assert [t for t, _ in again] == expected[:2], dump(mesh)

        def replaced():
            s = st(mesh)
            warm = {i["function_id"] for i in s["instances"] if i["state"] == "warm" and i["node"] == survivor}
            return len(warm) == 8  # all-remote on the tiny model: 2 layers x 4 experts
        wait_until(replaced, f"every function re-placed on {survivor}")


def test_ghosts_are_stopped_when_a_dead_node_comes_back(tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote", **FAST}) as mesh:
        address = mesh.endpoints["client"]
        assert [t for t, _ in asyncio.run(generate_all(address, PROMPTS[:1]))] == reference[:1]
        before = [i for i in st(mesh)["instances"] if i["state"] == "warm"]
        assert before
        daemon = next(iter(mesh.daemons.values()))
        os.kill(daemon.pid, signal.SIGSTOP)  # silent daemon, its workers still running
        try:
            wait_until(lambda: not st(mesh)["nodes"][0]["alive"], "the frozen node marked dead")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        wait_until(lambda: st(mesh)["nodes"][0]["alive"], "the node back")
        # its old instances are ghosts now (the registry failed them): the coordinator stops them
        wait_until(lambda: all(dead(i["pid"]) for i in before), "every ghost stopped")
        s = st(mesh)
        states = {i["instance_id"]: i["state"] for i in s["instances"]}
        assert all(states[i["instance_id"]] == "failed" for i in before), states
        assert "(a ghost): stopping it" in (tmp_path / "logs" / "coordinator.log").read_text()
        assert [t for t, _ in asyncio.run(generate_all(address, PROMPTS[:2]))] == reference[:2], dump(mesh)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_coordinator_restart_daemons_re_register_and_their_old_instances_are_stopped(tiny_model, reference,
                                                                                     tmp_path):
    ports = {f"coordinator.{k}_port": _free_port() for k in ("client", "control", "metrics")}
    config = mesh_config(tiny_model, **{"policy.name": "all-remote", **FAST, **ports})
    with Mesh(config, log_dir=tmp_path / "logs", run_dir=tmp_path / "run") as mesh:
        mesh.start(timeout_s=120)
        address = mesh.endpoints["client"]
        assert [t for t, _ in asyncio.run(generate_all(address, PROMPTS[:1]))] == reference[:1]
        before = [i for i in st(mesh)["instances"] if i["state"] == "warm"]
        daemon_pid = next(iter(mesh.daemons.values())).pid
        mesh.coordinator.kill()
        mesh.coordinator.wait(10)
        # a new coordinator on the same ports (what a supervisor of the coordinator would do)
        mesh._ready_lines = queue.Queue()
        mesh.coordinator = mesh._popen("coordinator", ["mesh.coordinator", "--config-json", mesh._blob])
        assert mesh._wait_ready(time.monotonic() + 120, 120) == mesh.endpoints
        node = wait_until(lambda: next((n for n in st(mesh)["nodes"] if n["alive"]), None),
                          "the daemon re-registered with the new coordinator")
        assert node["pid"] == daemon_pid  # the same daemon, reconnected (capped exponential backoff)
        wait_until(lambda: all(dead(i["pid"]) for i in before), "the old coordinator's instances stopped")
        got = asyncio.run(generate_all(address, PROMPTS[:2]))
        assert [t for t, _ in got] == reference[:2], dump(mesh)
        assert "(a ghost): stopping it" in (tmp_path / "logs" / "coordinator.log").read_text()


def test_mesh_up_restarts_a_killed_daemon_and_keeps_serving(tiny_model, reference, tmp_path):
    config = mesh_config(tiny_model, **{"policy.name": "all-remote"})
    toml = tmp_path / "launch.toml"
    toml.write_text(_to_toml(config.to_dict()))
    err = open(tmp_path / "mesh-up.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "mesh.launcher", "--config", str(toml), "--log-dir",
                             str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    err.close()
    try:
        line = ""
        while "mesh is up" not in line:
            line = proc.stdout.readline().decode()
            assert line or proc.poll() is None, (tmp_path / "mesh-up.err").read_text()
        address = line.split("client address: ")[1].split()[0]

        def node(client) -> dict:
            return client.status()["nodes"][0]

        with SyncMeshClient(address) as client:
            first = node(client)
            assert first["alive"] and first["pid"]
            os.kill(first["pid"], signal.SIGKILL)
            wait_until(lambda: (n := node(client))["alive"] and n["pid"] != first["pid"],
                       "the daemon restarted by mesh-up and registered")
            tokens = [t.token_id for t in client.generate("", prompt_ids=PROMPTS[0], max_new_tokens=12,
                                                         stop_at_eos=False)]
        assert tokens == reference[0]
        assert proc.poll() is None, "mesh-up exited after a daemon died"
        assert "restarted" in (tmp_path / "mesh-up.err").read_text()
        sigterm_leaves_nothing(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# -- mesh-up's parts, as units -----------------------------------------------------------------


def _coordinator_stub(mesh: Mesh, code: str) -> subprocess.Popen:
    """A stand-in coordinator process whose stdout mesh-up reads as it reads the real one's."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    mesh.coordinator = proc
    threading.Thread(target=_pump, args=(proc.stdout, None, "", mesh._ready_lines), daemon=True).start()
    return proc


def test_a_silent_coordinator_fails_mesh_up_at_its_deadline(tiny_model):
    mesh = Mesh(mesh_config(tiny_model))
    proc = _coordinator_stub(mesh, "import signal; print('loading', flush=True); signal.pause()")
    try:
        start = time.monotonic()
        with pytest.raises(MeshError, match="not ready within 1 s") as err:
            mesh._wait_ready(time.monotonic() + 1.0, 1.0)
        assert time.monotonic() - start < 10  # the deadline held although no line ever came
        assert err.value.code == "timeout"
    finally:
        proc.kill()
        proc.wait()
    mesh = Mesh(mesh_config(tiny_model))
    _coordinator_stub(mesh, "import sys; sys.exit(3)")
    with pytest.raises(MeshError, match="exited with code 3 before it was ready"):
        mesh._wait_ready(time.monotonic() + 30, 30)


class _Proc:
    """A finished or running child, as supervise() sees it."""

    def __init__(self, code: int | None, pid: int = 4242) -> None:
        self.returncode, self.pid = code, pid

    def poll(self) -> int | None:
        return self.returncode


def test_supervise_restarts_a_dead_daemon_with_capped_backoff_then_gives_up(tiny_model):
    mesh = Mesh(mesh_config(tiny_model))
    mesh.coordinator = _Proc(None)
    started: list[float] = []
    said: list[str] = []
    clock = {"now": 1000.0}

    def start_daemon(name: str) -> None:
        started.append(clock["now"])
        mesh.daemons[name] = _Proc(-9)  # dies again at once

    mesh._start_daemon = start_daemon
    name = mesh.config.nodes[0].name
    mesh.daemons[name] = _Proc(-9)
    for _ in range(2000):  # 0.1 s steps of a fake clock
        mesh.supervise(lambda _n, what: said.append(what), now=clock["now"])
        clock["now"] += 0.1
    delays = [round(b - a, 1) for a, b in zip([1000.0, *started], started)]
    assert len(started) == MAX_RESTARTS and name in mesh.given_up
    assert delays[:4] == [1.0, 2.0 + 0.1, 4.0 + 0.1, 8.0 + 0.1]  # doubling (one poll step to notice)
    assert any("gave up" in s for s in said) and any("restarting in 1 s" in s for s in said)
    mesh.coordinator = _Proc(0)  # the coordinator is gone: nothing is restarted any more
    mesh.given_up.clear()
    mesh.supervise(now=clock["now"] + 1000)
    assert len(started) == MAX_RESTARTS


def test_ssh_daemon_command_is_built_from_the_config(tiny_model):
    host = HostConfig(name="gpu-box", address="10.0.0.7", ssh="mesh@10.0.0.7")
    blob = json.dumps({"model": {"path": "/srv/models/my model"}, "x": "$(rm -rf /); `id`"})
    argv = ssh_daemon_argv(host, "gpu0", "tcp://10.0.0.1:7556", blob, python="/opt/venv/bin/python",
                           run_dir="/tmp/run/gpu0")
    assert argv[0] == "ssh" and "-tt" in argv and "BatchMode=yes" in argv
    assert argv[-2] == "mesh@10.0.0.7"
    remote = shlex.split(argv[-1])  # what the remote login shell runs, word by word
    assert remote == ["exec", "/opt/venv/bin/python", "-m", "nodes.daemon", "--node", "gpu0", "--control",
                      "tcp://10.0.0.1:7556", "--config-json", blob, "--run-dir", "/tmp/run/gpu0"]
    probe = ssh_probe_argv(host, sys.executable, str(tiny_model))[-1]  # run by a shell, as sshd would
    said = subprocess.run(["sh", "-c", probe], capture_output=True, timeout=60).stdout.decode().split()
    assert said == [local_version(), "True"]
    with pytest.raises(MeshError, match="no ssh key"):
        ssh_daemon_argv(HostConfig(name="local"), "cpu0", "tcp://127.0.0.1:1", "{}")


def test_check_reports_unreachable_hosts_wrong_versions_and_a_loopback_coordinator(tiny_model):
    base = mesh_config(tiny_model).to_dict()
    hosts = [{"name": "local", "address": "127.0.0.1"},
             {"name": "a", "address": "10.0.0.2", "ssh": "me@a"},
             {"name": "b", "address": "10.0.0.3", "ssh": "me@b"}]
    nodes = [{"name": "n0", "host": "local"}, {"name": "na", "host": "a"}, {"name": "nb", "host": "b"}]
    config = MeshConfig.from_dict(base | {"hosts": hosts, "nodes": nodes})
    calls = []

    def fake_run(argv, **_):
        calls.append(argv)
        if "me@a" in argv:
            return subprocess.CompletedProcess(argv, 0, local_version().encode() + b"\nTrue\n", b"")
        return subprocess.CompletedProcess(argv, 255, b"", b"ssh: connect to host b port 22: No route to host\n")

    problems = check(config, run=fake_run)
    assert [c[-2] for c in calls] == ["me@a", "me@b"]  # only the ssh hosts, nothing started
    assert any("loopback coordinator" in p for p in problems)
    assert any("[[hosts]] b" in p and "No route to host" in p for p in problems)
    assert not any("[[hosts]] a" in p for p in problems)

    def old_version(argv, **_):
        return subprocess.CompletedProcess(argv, 0, b"0.0.1\nFalse\n", b"")

    remote_ok = MeshConfig.from_dict(base | {"hosts": hosts[:2], "nodes": nodes[:2],
                                             "coordinator": base["coordinator"] | {"host": "0.0.0.0"}})
    problems = check(remote_ok, run=old_version)
    assert [p for p in problems if "moemesh 0.0.1 there" in p] and [p for p in problems if "no checkpoint" in p]
    assert shlex.split(calls[0][-1])[-1] == str(tiny_model)  # the probe asks about this model's path
    assert check(mesh_config(tiny_model), run=fake_run) == []  # all local, ports 0: nothing to fault


def test_mesh_up_check_starts_nothing(tiny_model, tmp_path):
    toml = tmp_path / "launch.toml"
    toml.write_text(_to_toml(mesh_config(tiny_model).to_dict()))
    done = subprocess.run([sys.executable, "-m", "mesh.launcher", "--config", str(toml), "--check"],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert b"ok (1 host(s), 1 node(s))" in done.stdout
    toml.write_text(_to_toml(mesh_config(tiny_model, **{"model.path": str(tmp_path / "nowhere")}).to_dict()))
    done = subprocess.run([sys.executable, "-m", "mesh.launcher", "--config", str(toml), "--check"],
                          capture_output=True, timeout=120)
    assert done.returncode == 2 and b"[model] path" in done.stderr, done.stderr.decode()


# -- the coordinator's reconcile, as a unit ------------------------------------------------------


class _ControlPlane:
    """What Coordinator._reconcile touches: a real Registry, a recording meter and node socket."""

    _reconcile = Coordinator._reconcile
    _retire_hung = Coordinator._retire_hung

    def __init__(self) -> None:
        self.registry = Registry()
        self.spec = FunctionSpec("f", ((0, 1),), 0.5, replicas=4)
        self.registry.set_plan(Plan("test", MainSpec(1.0), frozenset(), (self.spec,)))
        self.config = SimpleNamespace(coordinator=SimpleNamespace(heartbeat_s=0.5))
        self.meter = SimpleNamespace(stopped=[], instance_stopped=lambda iid, at, why: self.meter.stopped.append((iid, why)))
        self.sent: list = []

    async def _to_node(self, name: str, msg) -> None:
        self.sent.append((name, msg))

    def instance(self, replica: int, warm: bool, requested_at: float) -> str:
        inst = self.registry.new_instance(self.spec, replica, "n0")
        inst.requested_at = requested_at
        if warm:
            self.registry.transition(inst.instance_id, State.WARM, endpoint="tcp://x", pid=1)
        return inst.instance_id


def test_reconcile_retires_hung_stops_ghosts_and_fails_what_a_node_stopped_listing():
    cp = _ControlPlane()
    now = time.time()
    ok, hung, fresh, gone_ = (cp.instance(0, True, now - 10), cp.instance(1, True, now - 10),
                              cp.instance(2, False, now), cp.instance(3, True, now - 10))
    node = CoordinatorNode("n0", "cpu", "127.0.0.1", 8.0, 1.0, time.time())

    def beat(now: float, *items: dict) -> list:
        async def run():
            cp.sent.clear()
            cp._reconcile(node, list(items), now)
            await asyncio.sleep(0)  # let the StopFunction sends it queued run
            return list(cp.sent)
        return asyncio.run(run())

    sent = beat(now, {"instance_id": ok, "state": "ready", "heartbeat_age_s": 0.1, "hung": False},
                {"instance_id": hung, "state": "ready", "heartbeat_age_s": 2.3, "hung": True},
                {"instance_id": "old-coordinators-0", "state": "ready", "heartbeat_age_s": 0.1, "hung": False})
    assert cp.registry.state_of(hung) is State.FAILED and (hung, "hung") in cp.meter.stopped
    assert {(m.instance_id, m.reason) for _, m in sent} == {(hung, "hung"), ("old-coordinators-0", "ghost")}
    assert cp.registry.state_of(ok) is State.WARM and cp.registry.state_of(fresh) is State.STARTING
    assert cp.registry.state_of(gone_) is State.WARM  # absent once: could be a message in flight

    sent = beat(now + 0.25, {"instance_id": ok, "state": "ready", "heartbeat_age_s": 7.0, "hung": False},
                {"instance_id": "old-coordinators-0", "state": "ready"})
    assert cp.registry.state_of(gone_) is State.FAILED and (gone_, "died") in cp.meter.stopped
    assert cp.registry.state_of(ok) is State.FAILED  # silent past the backstop, flagged or not
    assert cp.registry.state_of(fresh) is State.STARTING  # within a heartbeat of its SpawnFunction
    assert not [m for _, m in sent if m.instance_id == "old-coordinators-0"]  # asked already, not again yet
    sent = beat(now + 6.0, {"instance_id": "old-coordinators-0", "state": "ready"},
                {"instance_id": "stopping-ghost", "state": "stopping"})
    assert [m.instance_id for _, m in sent] == ["old-coordinators-0"]  # re-asked; one already stopping is left be
    assert cp.registry.state_of(fresh) is State.STARTING  # missed once
    beat(now + 6.5)
    assert cp.registry.state_of(fresh) is State.FAILED and (fresh, "died") in cp.meter.stopped  # missed twice


FAKE_SSH = """#!/bin/sh
# A stand-in for ssh: drops its options and the host, runs the remote command with a shell,
# as sshd would run it with the login shell on the far host (here: this machine).
while [ $# -gt 0 ]; do
  case "$1" in
    -o) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$1" >> "$(dirname "$0")/hosts-used"
shift
exec sh -c "$*"
"""


def test_mesh_up_starts_an_ssh_hosts_daemon_with_its_command_and_prefixes_its_log(tiny_model, reference, tmp_path):
    """The ssh path end to end, with `ssh` replaced by a script that runs the command here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    base = mesh_config(tiny_model, **{"policy.name": "all-remote"}).to_dict()
    hosts = [{"name": "local", "address": "127.0.0.1"}, {"name": "far", "address": "127.0.0.1", "ssh": "me@far"}]
    nodes = [base["nodes"][0] | {"name": "farnode", "host": "far"}]
    toml = tmp_path / "launch.toml"
    toml.write_text(_to_toml(base | {"hosts": hosts, "nodes": nodes}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "mesh.launcher", "--config", str(toml), "--log-dir", str(logs),
                             "--remote-python", sys.executable], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=os.getcwd())
    try:
        address = mesh_up_address(proc)
        with SyncMeshClient(address) as client:
            tokens = [t.token_id for t in client.generate("", prompt_ids=PROMPTS[0], max_new_tokens=12,
                                                         stop_at_eos=False)]
            assert [n["name"] for n in client.status()["nodes"] if n["alive"]] == ["farnode"]
        assert tokens == reference[0]
        assert (bin_dir / "hosts-used").read_text().split() == ["me@far"]
        log_lines = (logs / "farnode.log").read_text().splitlines()
        assert log_lines and all(x.startswith("[far] ") for x in log_lines), log_lines[:5]
        assert any("registered with the coordinator" in x for x in log_lines)
        sigterm_leaves_nothing(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
