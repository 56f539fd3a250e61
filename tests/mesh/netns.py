"""Linux network namespaces as "hosts" for multi-host tests, and an sshd per host.

    net = Network()                       # namespaces named mm<pid>-<tag>, unique per test run
    hub = net.add("coord")                # a namespace (loopback up)
    hosts = [net.add(f"h{i}") for i in (1, 2, 3)]
    addr = net.star(hub, hosts)           # bridge br0 in `hub`, one veth per host:
                                          #   {hub: "10.213.0.1", h1: "10.213.0.2", ...}
    net.popen(hub, [...])                 # `ip netns exec <ns> ...`
    net.link(h1, up=False)                # cut h1's link (its eth0); up=True heals it
    net.close()                           # kills every process left in them, deletes them

Topology: one bridge `br0` inside the hub namespace holds the hub's address (.1); each other
namespace gets a veth pair, `eth0` (its address) on its side and `v<i>` on the bridge. Links
are made inside the namespaces (`ip -n`), never in the root namespace, so deleting a
namespace deletes its links, and nothing routes between the root namespace and these ones:
every packet of a test stays between namespaces it made (or on their loopbacks).

`skip_reason()` says why namespaces cannot be made here (not root, no `ip`, no netns support,
no sshd or ssh client), for `pytest.skip`. `Sshd` runs `/usr/sbin/sshd -D` in a namespace with
its own host key, config and authorized_keys in a temporary folder; `SshClient` is the
matching client side (identity, known_hosts with the hosts' real keys, an ssh config file for
`ssh -F`, which mesh-up takes from $MOEMESH_SSH_CONFIG).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

SUBNET = "10.213.0"  # inside the namespaces only: no route to or from the root namespace
SSHD = "/usr/sbin/sshd"
_NAME = re.compile(r"mm(\d+)-[a-z0-9]+")


def skip_reason() -> str | None:
    """Why network namespaces (and the sshd the ssh tests need) cannot be used here; None: they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (install openssh-client)"
    if not os.access(SSHD, os.X_OK):
        return f"no {SSHD} (install openssh-server; .ci/run does as root)"
    probe = f"mm{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot make a network namespace: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def pids_in(ns: str) -> list[int]:
    """Pids of the processes whose network namespace is `ns` (`ip netns pids`)."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _kill_all_in(ns: str, timeout_s: float = 10.0) -> None:
    procs = []
    for pid in pids_in(ns):
        try:
            proc = psutil.Process(pid)
            proc.kill()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)


def remove_stale() -> None:
    """Delete namespaces left by an earlier run of these tests that died (its pid is gone)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.fullmatch(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            _kill_all_in(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Network:
    """The namespaces of one test run; close() (also at exit) removes them and their processes."""

    def __init__(self) -> None:
        self.prefix = f"mm{os.getpid()}"
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}
        self.links: dict[str, tuple[str, str]] = {}  # ns -> (its own link, the hub it hangs on)
        remove_stale()
        atexit.register(self.close)

    def add(self, tag: str) -> str:
        """A new namespace `mm<pid>-<tag>` with its loopback up."""
        name = f"{self.prefix}-{tag}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def star(self, hub: str, leaves: list[str], subnet: str = SUBNET) -> dict[str, str]:
        """Bridge `br0` in `hub` (address subnet.1) and a veth from it to each leaf (.2, .3, ...)."""
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{subnet}.1/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        self.addresses[hub] = f"{subnet}.1"
        for i, leaf in enumerate(leaves, start=2):
            port = f"v{i}"
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", leaf)
            _ip("-n", hub, "link", "set", port, "master", "br0", "up")
            _ip("-n", leaf, "addr", "add", f"{subnet}.{i}/24", "dev", "eth0")
            _ip("-n", leaf, "link", "set", "eth0", "up")
            self.addresses[leaf] = f"{subnet}.{i}"
            self.links[leaf] = ("eth0", hub)
        return dict(self.addresses)

    def link(self, ns: str, up: bool) -> None:
        """Take `ns`'s link down (a cut cable) or back up."""
        _ip("-n", ns, "link", "set", self.links[ns][0], "up" if up else "down")

    def argv(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of `argv` inside `ns`."""
        return subprocess.run(self.argv(ns, argv), **kwargs)

    def popen(self, ns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen of `argv` inside `ns` (`ip netns exec` execs it: the pid is argv's)."""
        return subprocess.Popen(self.argv(ns, argv), **kwargs)

    def close(self) -> None:
        """Kill every process left in these namespaces, then delete them (and so their links)."""
        for ns in reversed(self.namespaces):
            _kill_all_in(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keygen(path: Path) -> str:
    """A new ed25519 key pair at `path` (no passphrase); its public line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "moemesh-test", "-f", str(path)],
                   check=True, capture_output=True)
    return Path(f"{path}.pub").read_text().strip()


class SshClient:
    """The client side: a fresh identity, known_hosts filled by Sshd, and an ssh config file
    (`config`) that uses only them, for `ssh -F config` (mesh-up: $MOEMESH_SSH_CONFIG). Remote
    commands get TMPDIR = `remote_tmp` (what they leave in a temporary folder stays in the test's)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.identity = folder / "id_ed25519"
        self.public = _keygen(self.identity)
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text("")
        self.remote_tmp = folder / "remote-tmp"  # TMPDIR of the remote commands (SetEnv)
        self.remote_tmp.mkdir(exist_ok=True)
        self.config = folder / "ssh_config"
        self.config.write_text(
            "Host *\n"
            f"  SetEnv TMPDIR={self.remote_tmp}\n"
            f"  IdentityFile {self.identity}\n"
            "  IdentitiesOnly yes\n"
            "  IdentityAgent none\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  ControlMaster no\n"
            "  LogLevel ERROR\n")


class Sshd:
    """`sshd -D` inside namespace `ns`, listening on `address`:22 only, with its own host key
    and config in `folder`, letting in root with the client's key only."""

    def __init__(self, net: Network, ns: str, address: str, folder: Path, client: SshClient) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.net, self.ns, self.address, self.folder, self.client = net, ns, address, folder, client
        self.host_key = folder / "ssh_host_ed25519_key"
        host_public = _keygen(self.host_key)
        (folder / "authorized_keys").write_text(client.public + "\n")
        self.config = folder / "sshd_config"
        self.config.write_text(
            f"ListenAddress {address}:22\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
            "PidFile none\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "AcceptEnv TMPDIR\n"
            "LogLevel VERBOSE\n")
        with client.known_hosts.open("a") as f:
            f.write(f"{address} {' '.join(host_public.split()[:2])}\n")
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start sshd and wait (on its log) until it listens."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = self.net.popen(self.ns, [SSHD, "-D", "-e", "-f", str(self.config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while b"Server listening on" not in self.log.read_bytes()[offset:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd in {self.ns} exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd in {self.ns} not listening within {timeout_s:.0f} s")
            time.sleep(0.05)  # polling sshd's log

    def stop(self) -> None:
        """Stop the listening sshd (sessions it forked live on, as with a real sshd restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


__all__ = ["SUBNET", "Network", "SshClient", "Sshd", "pids_in", "remove_stale", "skip_reason"]
