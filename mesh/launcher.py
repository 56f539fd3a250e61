"""`mesh-up`: bring the mesh up from launch.toml, wait until it is ready, and keep it up.

    mesh-up                         # coordinator + every [[nodes]] daemon as local processes
    mesh-up --run-main-job          # ... then run the main job on the bundled model and stop
    mesh-up --set policy.name=all-local --set functions.keep_alive_s=10

Every child gets the whole config explicitly (`--config-json`); CLI flags only override keys.
Ctrl-C or SIGTERM shuts everything down (the coordinator tells the daemons, daemons stop their
workers) and nothing is left behind: children also die with this process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.config import MeshConfig, load_config
from mesh.errors import MeshError

log = logging.getLogger("moemesh.launcher")


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if this launcher dies, whatever the cause."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Mesh:
    """The processes of one mesh on this host; a context manager that always cleans up."""

    def __init__(self, config: MeshConfig, log_dir: Path | None = None, quiet: bool = False,
                 run_dir: Path | None = None) -> None:
        self.config = config
        self.log_dir = log_dir
        self.run_dir = run_dir  # the daemons' run records (workers' own start/stop times)
        self.quiet = quiet
        self.coordinator: subprocess.Popen | None = None
        self.daemons: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen:
        stderr = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        elif self.quiet:
            stderr = subprocess.DEVNULL
        return subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE if name == "coordinator" else
                                subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, timeout_s: float = 120.0, progress=None) -> dict[str, str]:
        blob = json.dumps(self.config.to_dict())
        progress = progress or (lambda *_: None)
        progress("coordinator", "starting (loading the model)")
        self.coordinator = self._popen("coordinator", ["mesh.coordinator", "--config-json", blob])
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.coordinator.stdout.readline().decode(errors="replace")
            if line.startswith("MOEMESH_READY "):
                self.endpoints = json.loads(line.split(" ", 1)[1])
                break
            if not line and self.coordinator.poll() is not None:
                raise MeshError(f"the coordinator exited with code {self.coordinator.returncode} before it was ready",
                                hint=f"read {self.log_dir}/coordinator.log" if self.log_dir else "run with --log-dir DIR")
            if time.monotonic() > deadline:
                raise MeshError(f"the coordinator was not ready within {timeout_s:.0f} s",
                                hint="a big model loads slowly: raise --timeout")
        progress("coordinator", f"ready at {self.endpoints['client']}")
        for node in self.config.nodes:
            progress(node.name, "starting")
            argv = ["nodes.daemon", "--node", node.name, "--control", self.endpoints["control"], "--config-json", blob]
            if self.run_dir is not None:
                argv += ["--run-dir", str(self.run_dir / node.name)]
            self.daemons[node.name] = self._popen(node.name, argv)
        asyncio.run(self._wait_nodes(deadline, progress))
        return self.endpoints

    async def _wait_nodes(self, deadline: float, progress) -> None:
        from mesh.client import MeshClient

        async with MeshClient(self.endpoints["client"]) as client:
            seen: set[str] = set()
            wanted = {n.name for n in self.config.nodes}
            while True:
                status = await client.status()
                alive = {n["name"] for n in status["nodes"] if n["alive"]}
                for name in sorted(alive - seen):
                    progress(name, "registered")
                seen |= alive
                if wanted <= alive:
                    return
                for name, proc in self.daemons.items():
                    if proc.poll() is not None:
                        raise MeshError(f"node daemon {name} exited with code {proc.returncode}",
                                        hint=f"read {self.log_dir}/{name}.log" if self.log_dir else "run with --log-dir DIR")
                if time.monotonic() > deadline:
                    raise MeshError(f"nodes {sorted(wanted - alive)} did not register in time",
                                    hint="check [[nodes]] in launch.toml and the daemons' logs (--log-dir)")
                await asyncio.sleep(0.1)  # polling a status call, not synchronising a test

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the coordinator (it shuts the daemons down), then make sure all are gone."""
        procs = [p for p in (self.coordinator, *self.daemons.values()) if p is not None]
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _progress(quiet: bool):
    start = time.monotonic()

    def show(name: str, what: str) -> None:
        if not quiet:
            print(f"  [{time.monotonic() - start:6.2f}s] {name:<12} {what}", file=sys.stderr, flush=True)

    return show


def parse_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set policy.name=all-local")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mesh-up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="launch.toml", help="launch file (default: ./launch.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a launch.toml key, e.g. policy.name=all-local (repeatable)")
    ap.add_argument("--run-main-job", action="store_true",
                    help="run the main job (prompts from ../shared/data on the bundled model), print "
                         "the billing summary, then shut down")
    ap.add_argument("--prompts", type=int, default=6, help="main job: how many prompts")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="main job: tokens per prompt")
    ap.add_argument("--tui", action="store_true", help="open the dashboard once the mesh is up")
    ap.add_argument("--log-dir", type=Path,
                    help="write each process's log to DIR/<name>.log (default: runs/mesh-<time>/)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the mesh to be ready")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path = Path(args.config)
    config = load_config(path if path.exists() else None, parse_overrides(args.set))

    log_dir = args.log_dir or Path("runs") / time.strftime("mesh-%Y%m%d-%H%M%S")
    mesh = Mesh(config, log_dir, quiet=args.quiet)
    stop = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"mesh-up: {len(config.nodes)} node(s), policy {config.policy.name}, model {config.model.path}",
              file=sys.stderr)
        endpoints = mesh.start(args.timeout, _progress(args.quiet))
        print(f"mesh is up. client address: {endpoints['client']}  metrics: {endpoints['metrics']}  "
              f"logs: {log_dir}/", flush=True)
        if args.run_main_job:
            from mesh.main_job import run_main_job

            return asyncio.run(run_main_job(endpoints["client"], args.prompts, args.max_new_tokens))
        if args.tui:
            from tui.cli import main as tui_main

            return tui_main(["--address", endpoints["metrics"], "--interval", str(config.coordinator.metrics_interval_s)])
        print("Ctrl-C to stop.", file=sys.stderr)
        while all(p.poll() is None for p in [mesh.coordinator, *mesh.daemons.values()]):
            time.sleep(0.5)
        print("a mesh process exited; shutting down", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nshutting down", file=sys.stderr)
        return 0
    except MeshError as exc:
        print(f"mesh-up: {exc}", file=sys.stderr)
        return 2
    finally:
        mesh.stop()


if __name__ == "__main__":
    raise SystemExit(main())
