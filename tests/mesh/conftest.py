"""Fixtures for end-to-end mesh tests: a tiny real checkpoint and real mesh processes."""

from __future__ import annotations

import contextlib
import json

import psutil
import pytest
import torch

from mesh.config import load_config
from mesh.launcher import Mesh
from nodes.model.checkpoint import Checkpoint, save_checkpoint
from nodes.model.config import MoEConfig
from nodes.model.model import MoEModel

TINY = dict(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=None)

PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 9, 7, 9, 3, 2], [38, 46], [26, 43, 38, 32, 7],
           [9, 50, 28, 8], [41, 9, 7, 1, 6, 9, 3, 9, 9], [37, 51, 0], [5, 8, 2, 0, 9, 7, 4, 9, 4, 4]]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer x 4-expert Mixtral saved as real safetensors (float32, exact)."""
    return write_tiny(tmp_path_factory.mktemp("tiny-mixtral"))


def write_tiny(path):
    """The random 2-layer x 4-expert Mixtral (seed 0) as float32 safetensors at `path`."""
    torch.manual_seed(0)
    model = MoEModel(MoEConfig.from_hf_dict(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in name else torch.randn(p.shape) * (0.5 if "gate.weight" in name else 0.2))
    save_checkpoint(model, TINY, path, dtype=torch.float32)
    return path


def mesh_up_address(proc) -> str:
    """Read a `mesh-up` process's stdout until "mesh is up"; its client address."""
    line = ""
    while "mesh is up" not in line:
        line = proc.stdout.readline().decode()
        assert line or proc.poll() is None, "mesh-up exited before the mesh was up"
    return line.split("client address: ")[1].split()[0]


@pytest.fixture(scope="session")
def reference(tiny_model):
    """Greedy continuations of PROMPTS by the in-process engine."""
    from nodes.model.engine import Engine, SamplingParams

    engine = Engine(Checkpoint(tiny_model).load_model())
    return engine.complete(PROMPTS, SamplingParams(max_new_tokens=12, stop_at_eos=False))


def mesh_config(model_path, **overrides):
    base = {
        "coordinator.client_port": 0, "coordinator.control_port": 0, "coordinator.metrics_port": 0,
        "coordinator.metrics_interval_s": 0.2, "coordinator.heartbeat_s": 0.5,
        "model.path": str(model_path), "functions.keep_alive_s": 30.0,
        "functions.cold_start_wait_s": 30.0, "policy.call_timeout_s": 5.0,
        "policy.profiles": "synthetic",  # tests plan from fixed numbers: fast and deterministic
        "policy.name": "all-remote",  # every expert a function unless a test says otherwise
    }
    base.update(overrides)
    config = load_config(None, base)
    # one node is enough on 2 cores: fewer zygotes importing torch
    return config.__class__.from_dict({**config.to_dict(), "nodes": [config.to_dict()["nodes"][0]]})


@contextlib.contextmanager
def running_mesh(model_path, tmp_path, **overrides):
    config = mesh_config(model_path, **overrides)
    mesh = Mesh(config, log_dir=tmp_path / "logs", run_dir=tmp_path / "run")
    pids: list[int] = []
    try:
        mesh.start(timeout_s=120)
        pids = [p.pid for p in (mesh.coordinator, *mesh.daemons.values())]
        yield mesh
    finally:
        before = {p for pid in pids if psutil.pid_exists(pid) for p in _tree(pid)}
        mesh.stop()
        _, alive = psutil.wait_procs([psutil.Process(p) for p in before if psutil.pid_exists(p)], timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left behind: {alive}"


def sigterm_leaves_nothing(proc) -> list[int]:
    """SIGTERM a running `mesh-up` process: it exits 0 and leaves no process of its tree behind.
    Returns the tree's pids as they were."""
    import os
    import signal

    tree = _tree(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    _, alive = psutil.wait_procs([psutil.Process(p) for p in tree if psutil.pid_exists(p)], timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left behind: {alive}"
    return tree


def _tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def dump(mesh: Mesh) -> str:
    """Process logs, for assertion messages."""
    out = []
    for f in sorted((mesh.log_dir or mesh.run_dir).glob("*.log")):
        out.append(f"--- {f.name}\n" + f.read_text()[-3000:])
    return "\n".join(out)


__all__ = ["PROMPTS", "TINY", "dump", "json", "mesh_config", "mesh_up_address", "running_mesh",
           "sigterm_leaves_nothing", "write_tiny"]
