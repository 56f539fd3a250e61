"""One daemon per node of a mesh on a host: a new daemon fences off an old one still running.

mesh-up restarts a node's daemon when it loses it, e.g. when the daemon's ssh session dropped
because a link was down for longer than ServerAlive's ~15 s. The old daemon may still run on its
host, cut off but alive; once the link heals it would heartbeat again beside the new one, under
the same node name, and the coordinator would see the node "restart" with every message.

So every daemon holds an exclusive ``flock`` on a lock file named for its node *and* its
coordinator's control endpoint (two meshes on one host, e.g. two test runs, never fence each
other), with its pid in it, for as long as it runs; the kernel drops the lock when the process
ends, however it ends. A new daemon that finds the lock held asks the holder to stop (SIGTERM:
the daemon's graceful shutdown stops its workers), waits up to ``grace_s`` for the lock, then
kills the holder (SIGKILL) and takes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

log = logging.getLogger("moemesh.fence")

POLL_S = 0.05  # how often a waiting daemon retries the lock (a deadline-bound retry, not a sync)


def lock_path(node: str, control: str, lock_dir: Path | None = None) -> Path:
    """The lock file of `node` under the coordinator at `control`."""
    key = hashlib.sha1(f"{node}\0{control}".encode()).hexdigest()[:16]
    # not $XDG_RUNTIME_DIR: logind removes it when the user's last session ends, lock and all
    folder = lock_dir or Path(tempfile.gettempdir()) / "moemesh-daemons"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{node}-{key}.lock"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def take(node: str, control: str, lock_dir: Path | None = None, grace_s: float = 10.0) -> int:
    """Hold the node's lock, stopping an earlier daemon of the same node and mesh if one holds
    it; returns the open file descriptor, which must stay open for the daemon's lifetime."""
    path = lock_path(node, control, lock_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if not _try_lock(fd):
        pid = _holder(fd)
        if pid is None or pid == os.getpid() or not _runs_node(pid, node):
            raise RuntimeError(f"{path} is locked by a process that is not a daemon of node {node!r} "
                               f"(pid in the file: {pid}); another daemon may be starting: stop it, or "
                               "remove the lock file")
        log.warning("node %s: an earlier daemon of this node (pid %d) still runs (its session was lost?); "
                    "stopping it", node, pid)
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                log.warning("node %s: pid %d did not stop within %.0f s; killing it", node, pid, grace_s)
                _signal(pid, signal.SIGKILL)
                fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel releases a killed process's lock
                break
            time.sleep(POLL_S)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _runs_node(pid: int, node: str) -> bool:
    """Whether `pid` was started for `node` (its argv names it): a pid in the file that was
    reused by an unrelated process since is never signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return node.encode() in argv


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # gone already: its lock is released or about to be
