"""Start and stop the HTTP front end as a process beside a running mesh (mesh-up, bench, tests).

    with FrontEnd(config, endpoints["client"], log_dir) as front:
        front.start()           # waits for MOEMESH_HTTP_READY; front.url = "http://127.0.0.1:8000"

The child gets the whole config explicitly (`--config-json`), dies with its parent
(PR_SET_PDEATHSIG, as mesh-up's other children), and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mesh.config import MeshConfig
from mesh.errors import MeshError

READY = "MOEMESH_HTTP_READY "


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _lines(stream, out: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        out.put(raw.decode(errors="replace"))
    out.put(None)
    stream.close()


class FrontEnd:
    def __init__(self, config: MeshConfig, client_address: str, log_dir: Path | None = None,
                 quiet: bool = False) -> None:
        self.config, self.client_address = config, client_address
        self.log_dir, self.quiet = log_dir, quiet
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> str:
        stderr = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / "http.log", "ab")  # noqa: SIM115 (the child owns it)
        elif self.quiet:
            stderr = subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh.http", "--config-json", json.dumps(self.config.to_dict()),
                 "--client", self.client_address], stdout=subprocess.PIPE, stderr=stderr,
                preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if hasattr(stderr, "close"):
                stderr.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(self.proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise MeshError(f"the HTTP front end was not ready within {timeout_s:.0f} s", code="timeout",
                                hint="read http.log in the log folder") from None
            if line is None:
                code = self.proc.wait(5)
                raise MeshError(f"the HTTP front end exited with code {code} before it was ready",
                                hint=f"is [http] port {self.config.http.resolved_port(self.config.coordinator)} free? read "
                                     f"{self.log_dir / 'http.log' if self.log_dir else 'its stderr'}")
            if line.startswith(READY):
                self.url = json.loads(line[len(READY):])["http"]
                return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FrontEnd:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
