"""Application-level liveness of workers, with a real daemon, zygote and workers (the test
plays the coordinator, as in test_daemon): the daemon pings every ready worker, the worker's
own serving loop answers; a SIGSTOPped worker (sockets open, loop frozen) is killed and
answered "died" within 3 s, and a stall of the daemon itself blames no worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from mesh.config import MeshConfig
from mesh.protocol import (
    InstanceReady,
    InstanceStopped,
    NodeHeartbeat,
    NodeRegister,
    SpawnFailed,
    SpawnFunction,
)
from nodes.daemon import HUNG_AFTER_S
from nodes.limits import Cgroups
from nodes.model.checkpoint import Checkpoint
from tests.nodes.test_daemon import FakeCoordinator, gone, serves_a_call
from tests.nodes.test_worker import make_checkpoint

NODE = f"l{uuid.uuid4().hex[:8]}"
DETECT_WITHIN_S = 3.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("liveness")
    ckpt = make_checkpoint(root / "ckpt")
    coordinator = FakeCoordinator(NODE)
    coordinator.start()
    config = MeshConfig.from_dict({
        "hosts": [{"name": "local", "address": "127.0.0.1"}],
        "nodes": [{"name": NODE, "host": "local", "capacity_gb": 4.0, "cpus": 2.0}],
        "functions": {"spawn": "zygote", "cgroups": "off", "keep_alive_s": 120.0},
        "coordinator": {"heartbeat_s": 0.2, "liveness": 10},
    })
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nodes.daemon", "--node", NODE, "--control", coordinator.endpoint,
         "--config-json", json.dumps(config.to_dict()), "--run-dir", str(root / "run")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    coordinator.wait_for(lambda m: isinstance(m, NodeRegister))
    state = {"coordinator": coordinator, "daemon": daemon, "ckpt": ckpt, "root": root}
    yield state
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGCONT)
        daemon.kill()
    daemon.wait(timeout=10)
    coordinator.done.set()
    coordinator.join(timeout=10)
    cgroups = Cgroups(NODE)
    cgroups.sweep()
    cgroups.close()


def _spawn(node, instance_id: str) -> InstanceReady:
    node["coordinator"].send(SpawnFunction(
        instance_id=instance_id, function_id="f0", experts=[(0, 1), (0, 2)], memory_gb=0.5, cpu_share=1.0,
        keep_alive_s=120.0, spawn="zygote", model_path=str(node["ckpt"]),
    ))
    ready = node["coordinator"].about(instance_id, InstanceReady, SpawnFailed)
    assert isinstance(ready, InstanceReady), (ready, (node["root"] / "daemon.log").read_text()[-3000:])
    return ready


def _beat_listing(node, instance_id: str, match) -> dict:
    beat = node["coordinator"].wait_for(
        lambda m: isinstance(m, NodeHeartbeat) and any(
            i["instance_id"] == instance_id and match(i) for i in m.instances))
    return next(i for i in beat.instances if i["instance_id"] == instance_id)


def test_heartbeats_carry_each_workers_own_liveness(node):
    _spawn(node, "w-live")
    listed = _beat_listing(node, "w-live", lambda i: i["state"] == "ready")
    assert listed["hung"] is False
    assert 0 <= listed["heartbeat_age_s"] < HUNG_AFTER_S


def test_sigstopped_worker_is_killed_and_answered_died_within_3s(node):
    ready = _spawn(node, "w-frozen")
    serves_a_call({"experts": Checkpoint(node["ckpt"]).load_experts([(0, 1), (0, 2)])}, ready.endpoint)
    _beat_listing(node, "w-frozen", lambda i: i["state"] == "ready" and i["heartbeat_age_s"] < 1.0)
    stopped_at = time.monotonic()
    os.kill(ready.pid, signal.SIGSTOP)
    try:
        stopped = node["coordinator"].about("w-frozen", InstanceStopped, timeout_s=30)
        detected_s = time.monotonic() - stopped_at
    finally:
        if not gone(ready.pid, 0):
            os.kill(ready.pid, signal.SIGCONT)
    print(f"\nSIGSTOPped worker detected and killed in {detected_s:.2f} s")
    assert stopped.reason == "died" and stopped.exit_code == -signal.SIGKILL
    assert detected_s < DETECT_WITHIN_S
    assert gone(ready.pid, 5.0)
    assert "hung" in (node["root"] / "daemon.log").read_text()


def test_a_stalled_daemon_blames_no_worker(node):
    """The daemon itself frozen for longer than hung_after_s: its workers did nothing wrong."""
    ready = _spawn(node, "w-innocent")
    coordinator = node["coordinator"]
    daemon = psutil.Process(node["daemon"].pid)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:  # the fault: the daemon stays frozen (not gone) for longer than hung_after_s
        with pytest.raises(psutil.TimeoutExpired):
            daemon.wait(timeout=HUNG_AFTER_S * 1.5)
        assert daemon.status() == psutil.STATUS_STOPPED
    finally:
        os.kill(node["daemon"].pid, signal.SIGCONT)
    coordinator.drop_all()
    # Two heartbeats after the stall that list it ready and answering: it was forgiven.
    for _ in range(2):
        listed = _beat_listing(node, "w-innocent", lambda i: i["state"] == "ready" and i["heartbeat_age_s"] < 1.0)
        assert listed["hung"] is False
    assert not any(isinstance(m, InstanceStopped) and m.instance_id == "w-innocent" for m in coordinator.messages)
    assert not gone(ready.pid, 0)
