"""nodes.fence: a new daemon of a node stops an earlier one still running (real processes, real
flock); other nodes and other meshes are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from nodes import fence

HOLDER = """
import signal, sys
from pathlib import Path
from nodes import fence
if sys.argv[4] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a daemon too stuck to stop: it is killed
fence.take(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
print("holding", flush=True)
sys.stdin.read()  # until the test closes stdin, or a signal ends it
"""


def holder(tmp_path, node: str = "cpu0", control: str = "tcp://10.0.0.1:7556", on_term: str = "default"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, node, control, str(tmp_path), on_term],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "holding"  # it holds the lock now
    return proc


def test_a_new_daemon_of_the_same_node_and_mesh_stops_the_old_one(tmp_path):
    old = holder(tmp_path)
    fd = fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path)
    try:
        assert old.wait(timeout=30) == -signal.SIGTERM
        path = fence.lock_path("cpu0", "tcp://10.0.0.1:7556", tmp_path)
        assert path.read_text() == str(os.getpid())
    finally:
        os.close(fd)


def test_one_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    old = holder(tmp_path, on_term="ignore")
    fd = fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path, grace_s=0.5)
    try:
        assert old.wait(timeout=30) == -signal.SIGKILL
    finally:
        os.close(fd)


def test_other_nodes_and_other_meshes_are_left_alone(tmp_path):
    other_node = holder(tmp_path, node="cpu1")
    other_mesh = holder(tmp_path, control="tcp://10.0.0.1:9999")
    fds = [fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path)]
    try:
        assert other_node.poll() is None and other_mesh.poll() is None
        fds.append(fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path / "elsewhere"))  # another lock dir
    finally:
        for fd in fds:
            os.close(fd)
        for proc in (other_node, other_mesh):
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0


def test_a_lock_left_by_a_dead_daemon_is_taken_at_once(tmp_path):
    old = holder(tmp_path)
    old.kill()
    old.wait(timeout=30)
    fd = fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path, grace_s=0.0)
    os.close(fd)


def test_a_pid_in_the_file_that_is_not_a_daemon_of_the_node_is_never_signalled(tmp_path):
    import fcntl

    path = fence.lock_path("cpu0", "tcp://10.0.0.1:7556", tmp_path)
    bystander = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, with a pid in the file that runs something else
    os.write(fd, str(bystander.pid).encode())
    try:
        with pytest.raises(RuntimeError, match="not a daemon of node 'cpu0'"):
            fence.take("cpu0", "tcp://10.0.0.1:7556", tmp_path, grace_s=0.1)
        assert bystander.poll() is None
    finally:
        os.close(fd)
        bystander.stdin.close()
        bystander.wait(timeout=30)
