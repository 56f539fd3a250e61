"""`mesh-up`: bring the mesh up from launch.toml, wait until it is ready, and keep it up.

    mesh-up                         # coordinator + every [[nodes]] daemon as local processes
    mesh-up --run-main-job          # ... then run the main job on the bundled model and stop
    mesh-up --set policy.name=all-local --set functions.keep_alive_s=10
    mesh-up --check                 # validate config, hosts, versions; start nothing

Every child gets the whole config explicitly (`--config-json`); CLI flags only override keys.
Ctrl-C or SIGTERM shuts everything down (the coordinator tells the daemons, daemons stop their
workers) and nothing is left behind: children also die with this process (PR_SET_PDEATHSIG).

A node daemon's death is not the mesh's: `mesh-up` restarts it after a capped exponential
backoff (1 s, 2 s, ... 30 s), at most MAX_RESTARTS times in RESTART_WINDOW_S, then reports
that it gave up on that node; the coordinator keeps serving on the others (it re-places the
dead node's functions). Only the coordinator's death ends the mesh.

Hosts with `ssh = "user@host"` in [[hosts]] get their daemons over plain `ssh` (BatchMode,
a pty so that a dropped connection hangs the remote daemon up): the remote command is
`python3 -m nodes.daemon ...` from the config (`--remote-python` to change the interpreter;
the package must be installed there, and [model] path must name the checkpoint there too). Their output is streamed to stderr (or DIR/<node>.log)
with a `[host]` prefix on every line; on shutdown the coordinator's Shutdown stops them and
the ssh clients are ended after. With CURVE ([security] keys_dir), each such host needs its
own pair and the coordinator's public key at the same keys_dir path (`mesh-up --check` looks).
ssh reads ~/.ssh/config as usual, or the file $MOEMESH_SSH_CONFIG names (`ssh -F`: identity,
known hosts, port per host). tests/mesh/test_netns_hosts.py runs all of this over real sshd
across network namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from mesh.config import HostConfig, MeshConfig, load_config
from mesh.errors import MeshError
from mesh.http.process import FrontEnd
from mesh.profile_store import ensure_profiles
from mesh.security import check as security_check

log = logging.getLogger("moemesh.launcher")

MAX_RESTARTS = 5  # restarts of one node daemon within RESTART_WINDOW_S before mesh-up gives up on it
RESTART_WINDOW_S = 300.0
RESTART_BACKOFF_S = (1.0, 30.0)  # first and largest delay before a restart
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3")
SSH_CONFIG_ENV = "MOEMESH_SSH_CONFIG"  # an ssh config file for every ssh mesh-up runs (ssh -F)


def ssh_command() -> list[str]:
    """`ssh` and the options mesh-up gives it. $MOEMESH_SSH_CONFIG, when set, names the ssh
    config file to read instead of ~/.ssh/config (`ssh -F FILE`): identity, known hosts, port,
    jump host per host, as in any ssh config (the tests use it for their own keys)."""
    config = os.environ.get(SSH_CONFIG_ENV)
    return ["ssh", *(("-F", config) if config else ()), *SSH_OPTIONS]


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if this launcher dies, whatever the cause. (The kernel
    sends it when the *thread* that forked the child ends: see Mesh.stop.)"""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def ssh_daemon_argv(host: HostConfig, node: str, control: str, config_json: str,
                    python: str = "python3", run_dir: str | None = None) -> list[str]:
    """The local argv that starts node daemon `node` on `host` over plain ssh.

    The remote side runs `exec <python> -m nodes.daemon --node ... --control ... --config-json
    ...` (every argument shell-quoted once, for the remote login shell); `-tt` gives it a pty,
    so that when the connection drops sshd hangs it up (SIGHUP) and its workers die with it.
    """
    if not host.ssh:
        raise MeshError(f"host {host.name!r} has no ssh key in [[hosts]]", code="config_error",
                        hint='set ssh = "user@host" for hosts whose daemons mesh-up starts remotely')
    remote = [python, "-m", "nodes.daemon", "--node", node, "--control", control, "--config-json", config_json]
    if run_dir is not None:
        remote += ["--run-dir", run_dir]
    return [*ssh_command(), "-tt", host.ssh, "exec " + " ".join(shlex.quote(a) for a in remote)]


def ssh_probe_argv(host: HostConfig, python: str = "python3", model_path: str = "",
                   key_files: tuple[str, ...] = ()) -> list[str]:
    """ssh argv that prints, on `host`, the moemesh version installed there, then whether
    `model_path`/config.json exists there ("True"/"False"), then (only when `key_files` are
    given) a JSON list of the key files that are missing there or, for a .secret, readable by
    others (for `mesh-up --check`)."""
    code = ("import importlib.metadata as m, json, os, sys; print(m.version('moemesh')); "
            "print(os.path.isfile(os.path.join(sys.argv[1], 'config.json'))); "
            "bad = [p + (': missing' if not os.path.isfile(p) else ': readable by others (chmod 600 it)') "
            "for p in sys.argv[2:] if not os.path.isfile(p) or (p.endswith('.secret') and "
            "os.stat(p).st_mode & 0o077)]; "
            "sys.argv[2:] and print(json.dumps(bad))")
    remote = " ".join(shlex.quote(a) for a in (python, "-c", code, model_path, *key_files))
    return [*ssh_command(), host.ssh or "", remote]


def host_key_files(config: MeshConfig, host: HostConfig) -> tuple[str, ...]:
    """The CURVE key files a daemon on `host` reads ([security] keys_dir at the same path there):
    its host's pair and the coordinator's public key; () when it uses no keys."""
    s = config.security
    if s.keys_dir is None or s.curve == "off":
        return ()
    pair = s.host_key(host.name)
    return tuple(str(Path(s.keys_dir) / f) for f in (f"{pair}.secret", f"{pair}.public", f"{s.coordinator_key}.public"))


def _pump(stream, sink, prefix: str = "", lines: queue.Queue | None = None) -> None:
    """Copy a child's output line by line to `sink` (a binary file; None: drop), each line with
    `prefix`; also put decoded lines on `lines`, and None at the end of the stream."""
    try:
        for raw in iter(stream.readline, b""):
            if lines is not None:
                lines.put(raw.decode(errors="replace"))
            if sink is not None:
                try:
                    sink.write(prefix.encode() + raw.rstrip(b"\r\n") + b"\n")
                    sink.flush()
                except (OSError, ValueError):
                    sink = None
    finally:
        if lines is not None:
            lines.put(None)
        stream.close()


class Mesh:
    """The processes of one mesh on this host; a context manager that always cleans up.

    start() brings the coordinator and every daemon up; supervise() (call it every second or
    so) restarts node daemons that died; stop() ends everything."""

    def __init__(self, config: MeshConfig, log_dir: Path | None = None, quiet: bool = False,
                 run_dir: Path | None = None, remote_python: str = "python3") -> None:
        self.config = config
        self.log_dir = log_dir
        self.run_dir = run_dir  # the daemons' run records (workers' own start/stop times)
        self.quiet = quiet
        self.remote_python = remote_python
        self.coordinator: subprocess.Popen | None = None
        self.daemons: dict[str, subprocess.Popen] = {}
        self.endpoints: dict[str, str] = {}
        self.restarts: dict[str, list[float]] = {}  # node -> monotonic times of its restarts
        self.restart_at: dict[str, float] = {}  # node -> when its pending restart is due
        self.given_up: set[str] = set()
        self.stopping = False
        self._blob = ""
        self._ready_lines: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # supervise() vs stop()
        self._stop_event = threading.Event()

    def _log_sink(self, name: str):
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            return open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child / pump)
        return subprocess.DEVNULL if self.quiet else None

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen:
        stderr = self._log_sink(name)
        try:
            proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE if name == "coordinator" else
                                    subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_parent,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if hasattr(stderr, "close"):
                stderr.close()
        if name == "coordinator":  # its ready line, read with a deadline; later output drained
            threading.Thread(target=_pump, args=(proc.stdout, None, "", self._ready_lines), daemon=True).start()
        return proc

    def _popen_ssh(self, node: str, host: HostConfig) -> subprocess.Popen:
        run_dir = str(self.run_dir / node) if self.run_dir is not None else None
        argv = ssh_daemon_argv(host, node, self.endpoints["control"], self._blob, self.remote_python, run_dir)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        sink = self._log_sink(node)
        if sink is None:
            sink = sys.stderr.buffer
        elif sink is subprocess.DEVNULL:
            sink = None
        threading.Thread(target=_pump, args=(proc.stdout, sink, f"[{host.name}] "), daemon=True).start()
        return proc

    def _start_daemon(self, name: str) -> None:
        node = next(n for n in self.config.nodes if n.name == name)
        host = {h.name: h for h in self.config.hosts}.get(node.host)
        if host is not None and host.ssh:
            self.daemons[name] = self._popen_ssh(name, host)
            return
        argv = ["nodes.daemon", "--node", name, "--control", self.endpoints["control"], "--config-json", self._blob]
        if self.run_dir is not None:
            argv += ["--run-dir", str(self.run_dir / name)]
        self.daemons[name] = self._popen(name, argv)

    def start(self, timeout_s: float = 120.0, progress=None) -> dict[str, str]:
        self._blob = json.dumps(self.config.to_dict())
        progress = progress or (lambda *_: None)
        ensure_profiles(self.config)  # [policy] profiles = "auto": measured on first use, then cached
        progress("coordinator", "starting (loading the model)")
        self.coordinator = self._popen("coordinator", ["mesh.coordinator", "--config-json", self._blob])
        deadline = time.monotonic() + timeout_s
        self.endpoints = self._wait_ready(deadline, timeout_s)
        progress("coordinator", f"ready at {self.endpoints['client']}")
        for node in self.config.nodes:
            progress(node.name, "starting")
            self._start_daemon(node.name)
        asyncio.run(self._wait_nodes(deadline, progress))
        return self.endpoints

    def _wait_ready(self, deadline: float, timeout_s: float) -> dict[str, str]:
        """The coordinator's MOEMESH_READY endpoints; a silent coordinator fails at the deadline."""
        while True:
            try:
                line = self._ready_lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise MeshError(f"the coordinator was not ready within {timeout_s:.0f} s",
                                code="timeout", hint="a big model loads slowly: raise --timeout") from None
            if line is not None and line.startswith("MOEMESH_READY "):
                return json.loads(line.split(" ", 1)[1])
            if line is None:  # its stdout closed: it exited (or closed it) before it was ready
                try:
                    code = self.coordinator.wait(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    code = None
                raise MeshError(f"the coordinator exited with code {code} before it was ready",
                                hint=f"read {self.log_dir}/coordinator.log" if self.log_dir else "run with --log-dir DIR")

    def supervise(self, progress=None, now: float | None = None) -> None:
        """Restart node daemons that exited (capped exponential backoff, at most MAX_RESTARTS
        in RESTART_WINDOW_S, then give up on that node and say so). Call it periodically."""
        if self.stopping or self.coordinator is None or self.coordinator.poll() is not None:
            return
        progress = progress or (lambda *_: None)
        now = time.monotonic() if now is None else now
        for name, proc in list(self.daemons.items()):
            if name in self.given_up or proc.poll() is None:
                continue
            if name not in self.restart_at:
                recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
                self.restarts[name] = recent
                if len(recent) >= MAX_RESTARTS:
                    self.given_up.add(name)
                    progress(name, f"exited with code {proc.returncode}; gave up after {len(recent)} restarts "
                                   f"in {RESTART_WINDOW_S:.0f} s: the mesh serves on without it")
                    continue
                first, cap = RESTART_BACKOFF_S
                delay = min(cap, first * 2 ** len(recent))
                self.restart_at[name] = now + delay
                progress(name, f"exited with code {proc.returncode}; restarting in {delay:.0f} s "
                               f"(restart {len(recent) + 1} of at most {MAX_RESTARTS})")
            elif now >= self.restart_at[name]:
                del self.restart_at[name]
                self.restarts.setdefault(name, []).append(now)
                try:
                    self._start_daemon(name)
                except OSError as exc:  # e.g. no ssh binary: counts as a failed restart
                    progress(name, f"could not restart: {exc}")
                    continue
                progress(name, f"restarted (pid {self.daemons[name].pid})")

    def supervise_in_background(self, progress=None, period_s: float = 0.5) -> threading.Thread:
        """supervise() every period_s on a daemon thread until stop()."""

        def loop() -> None:
            while not self._stop_event.wait(period_s):
                with self._lock:
                    try:
                        self.supervise(progress)
                    except Exception:  # never let supervision take mesh-up down
                        log.exception("supervising the node daemons failed (retrying)")

        thread = threading.Thread(target=loop, name="mesh-up supervisor", daemon=True)
        thread.start()
        return thread

    async def _wait_nodes(self, deadline: float, progress) -> None:
        from mesh.client import MeshClient

        async with MeshClient.from_config(self.endpoints["client"], self.config) as client:
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
        """SIGTERM the coordinator (it shuts the daemons down), then make sure all are gone.

        The supervisor thread is ended last: a daemon (or its ssh client) that it restarted has
        that thread as its PR_SET_PDEATHSIG parent, and would be SIGKILLed, missing its graceful
        Shutdown, the moment the thread ended."""
        with self._lock:  # no restart once stopping
            self.stopping = True
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
        self._stop_event.set()

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


def local_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moemesh")
    except PackageNotFoundError:
        return "unknown"


def check(config: MeshConfig, remote_python: str = "python3", run=subprocess.run) -> list[str]:
    """What would stop this config from coming up, without starting anything: one line per
    problem (empty: none). The config itself was validated when it was loaded; this checks
    the model path, that the coordinator's fixed ports are free, that remote hosts can reach a
    non-loopback coordinator, that the CURVE keys [security] names are here (mesh.security.check),
    and (over ssh, BatchMode) that each ssh host has this moemesh version installed, the
    model's checkpoint at the same path and its CURVE key files (host_key_files) at the same
    keys_dir path. `run` is subprocess.run (a fake in unit tests)."""
    problems: list[str] = []
    c = config.coordinator
    try:
        model = config.model.resolved_path()
        if not (model / "config.json").exists():
            problems.append(f"[model] path: no config.json in {model}; point it at an HF-layout checkpoint folder")
    except Exception as exc:  # noqa: BLE001 - any unusable path is a problem to report
        problems.append(f"[model] path: {exc}")
    for key in ("client_port", "control_port", "metrics_port"):
        port = getattr(c, key)
        if not port:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((c.host, port))
            except OSError as exc:
                problems.append(f"[coordinator] {key} = {port} on {c.host}: {exc.strerror}; stop what uses it "
                                f"or set coordinator.{key} = 0")
    used = {n.host for n in config.nodes}
    remote = [h for h in config.hosts if h.ssh and h.name in used]
    if remote and c.host in ("127.0.0.1", "localhost", "::1"):
        problems.append(f"[coordinator] host = {c.host!r}: hosts {[h.name for h in remote]} start daemons over "
                        "ssh and cannot reach a loopback coordinator; set a reachable address")
    problems += [f"[security] {line}" for line in security_check(config)]  # keys here, as the config names them
    mine = local_version()
    try:
        model_path = str(config.model.resolved_path())
    except Exception:  # noqa: BLE001 - reported above
        model_path = ""
    for host in remote:
        try:
            done = run(ssh_probe_argv(host, remote_python, model_path, host_key_files(config, host)),
                       capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"[[hosts]] {host.name} (ssh {host.ssh}): {exc}")
            continue
        if done.returncode != 0:
            err = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
            problems.append(f"[[hosts]] {host.name} (ssh {host.ssh}): exit {done.returncode} {err[0]}; check "
                            f"that key-based ssh works (BatchMode) and moemesh is installed for {remote_python}")
            continue
        said = [line.strip() for line in (done.stdout or b"").decode(errors="replace").splitlines() if line.strip()]
        theirs = said[0] if said else ""
        if theirs != mine:
            problems.append(f"[[hosts]] {host.name}: moemesh {theirs or '?'} there, {mine} here; install the same "
                            "version on every host")
        if said[1:2] == ["False"]:
            problems.append(f"[[hosts]] {host.name}: no checkpoint at {model_path} there; its workers load expert "
                            "weights from the same [model] path (copy or mount it)")
        try:
            bad_keys = json.loads(said[2]) if len(said) > 2 else []
        except json.JSONDecodeError:
            bad_keys = [said[2]]
        for what in bad_keys:
            problems.append(f"[[hosts]] {host.name}: key file {what} on that host; each ssh host needs its own "
                            "pair and the coordinator's .public at the same security.keys_dir path (moemesh keys)")
    return problems


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
    ap.add_argument("--preset", metavar="NAME[:LAYERS]",
                    help="serve a realistic-size synthetic checkpoint instead of [model] path (moemesh synth "
                         "presets: qwen1.5-moe-a2.7b, deepseek-v2-lite, mixtral-8x7b; generated on first use, "
                         "cached in checkpoints/), in bfloat16, e.g. --preset qwen1.5-moe-a2.7b:4")
    ap.add_argument("--compare", default="all-local,all-remote", metavar="POLICY,...",
                    help="main job: then replay the same prompts on a fresh mesh per policy and print the "
                         "meters side by side ('' for none)")
    ap.add_argument("--tui", action="store_true", help="open the dashboard once the mesh is up")
    ap.add_argument("--log-dir", type=Path,
                    help="write each process's log to DIR/<name>.log (default: runs/mesh-<time>/)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the mesh to be ready")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="validate the config, hosts, ports and remote versions, start nothing, and exit "
                         "(0: all good, 2: problems, each printed)")
    ap.add_argument("--remote-python", default="python3",
                    help="interpreter that runs nodes.daemon on [[hosts]] with ssh (default: python3)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path = Path(args.config)
    try:
        overrides = parse_overrides(args.set)
        if args.preset:  # a realistic-size synthetic checkpoint, generated on first use (progress bar)
            from nodes.synth import ensure_checkpoint

            name, _, layers = args.preset.partition(":")
            overrides = {"model.path": str(ensure_checkpoint(name, int(layers) if layers else None).resolve()),
                         "model.dtype": "bfloat16", **overrides}
        config = load_config(path if path.exists() else None, overrides)
    except MeshError as exc:
        print(f"mesh-up: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(config, args.remote_python)
        for line in problems:
            print(f"mesh-up --check: {line}", file=sys.stderr)
        if not problems:
            print(f"mesh-up --check: ok ({len(config.hosts)} host(s), {len(config.nodes)} node(s))")
        return 2 if problems else 0

    log_dir = args.log_dir or Path("runs") / time.strftime("mesh-%Y%m%d-%H%M%S")
    mesh = Mesh(config, log_dir, quiet=args.quiet, remote_python=args.remote_python)
    front = FrontEnd(config, "", log_dir, quiet=args.quiet)  # [http]: the OpenAI-compatible front end
    stop = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        print(f"mesh-up: {len(config.nodes)} node(s), policy {config.policy.name}, model {config.model.path}",
              file=sys.stderr)
        endpoints = mesh.start(args.timeout, _progress(args.quiet))
        if config.http.enabled:
            front.client_address = endpoints["client"]
            front.start()
        http = f"http: {front.url}/v1  " if front.url else ""
        prometheus = f"prometheus: {endpoints['http_metrics']}/metrics  " if endpoints.get("http_metrics") else ""
        print(f"mesh is up. client address: {endpoints['client']}  metrics: {endpoints['metrics']}  "
              f"{http}{prometheus}logs: {log_dir}/", flush=True)
        mesh.supervise_in_background(_progress(False))  # restarts and give-ups are always reported
        if args.run_main_job:
            from mesh.main_job import run_main_job

            others = tuple(p for p in args.compare.split(",") if p and p != config.policy.name)
            return asyncio.run(run_main_job(endpoints["client"], args.prompts, args.max_new_tokens,
                                            config=config, compare_with=others))
        if args.tui:
            from tui.cli import main as tui_main

            return tui_main(["--address", endpoints["metrics"], "--interval", str(config.coordinator.metrics_interval_s)])
        print("Ctrl-C to stop.", file=sys.stderr)
        mesh.coordinator.wait()  # only the coordinator's death ends the mesh
        print(f"the coordinator exited (code {mesh.coordinator.returncode}); shutting down", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nshutting down", file=sys.stderr)
        return 0
    except MeshError as exc:
        print(f"mesh-up: {exc}", file=sys.stderr)
        return 2
    finally:
        try:
            front.stop()
        finally:  # a second signal during front.stop() must not skip the mesh's own shutdown
            mesh.stop()


if __name__ == "__main__":
    raise SystemExit(main())
