"""CURVE encryption and ZAP authentication of the mesh's sockets, and the `moemesh keys` files.

Called by `mesh.sockets.harden(sock, role, config, bind=... | connect=...)` at every socket
site, before the socket binds or dials. Keys are files in `[security] keys_dir`, written by
`moemesh keys --out DIR --name NAME`: `NAME.public` (z85, 40 characters) and `NAME.secret`
(z85, mode 0600). Who serves with which pair, and whom it lets in:

    socket (role)                  serves with            allows                   ZAP domain
    coordinator client   ROUTER    coordinator_key        client_keys              moemesh-client
    coordinator control  ROUTER    coordinator_key        every host's key         moemesh-control
    coordinator metrics  PUB       coordinator_key        client_keys + host keys  moemesh-metrics
    worker data          ROUTER    its host's key         coordinator_key          moemesh-data
    daemon workers       ROUTER    its host's key         its host's key           moemesh-workers

Dialling sockets use their own pair (the SDK and dashboards a client pair, daemons and workers
their host's, the executor the coordinator's) and the public key of the server they dial (the
host's of a worker is found from the endpoint's address among the [[hosts]] addresses).

When CURVE is on: `curve = "on"`: always; `"auto"`: when the bound (or dialled) address is off
loopback; `"off"`: never. An off-loopback bind without CURVE raises ConfigError naming the key
to set, unless `allow_insecure_off_loopback`.

ZAP: the first CURVE server socket of a ZeroMQ context starts that context's handler
(`inproc://zeromq.zap.01`) before it binds, so that no handshake is ever made unchecked. Each
server socket sets its ZAP domain with ZAP_ENFORCE_DOMAIN, and the handler refuses unknown
domains, mechanisms other than CURVE and keys not allowed in that domain. The handler is this
module's own small thread rather than `zmq.auth.thread.ThreadAuthenticator`: that one keeps a
pipe socket on the caller's thread, so the `Context.term()` that workers and daemons do on exit
would block forever; ours owns its one socket and closes it when the context terminates.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from mesh.config import MeshConfig, SecurityConfig
from mesh.errors import ConfigError

__all__ = [
    "DOMAINS",
    "Setup",
    "ZapHandler",
    "bundle",
    "check",
    "is_loopback",
    "make_keys",
    "read_public",
    "read_secret",
    "secure",
    "setup_of",
    "zap_handler",
]

DOMAINS: dict[str, str] = {
    "client": "moemesh-client",
    "control": "moemesh-control",
    "metrics": "moemesh-metrics",
    "data": "moemesh-data",
    "workers": "moemesh-workers",
}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEYS_HINT = "make key pairs with `moemesh keys --out DIR --name NAME` and set security.keys_dir = DIR"


# ------------------------------------------------------------------------------- key files


def make_keys(out_dir: str | Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new CURVE key pair: `out_dir/NAME.public` and `out_dir/NAME.secret` (0600).

    Returns (public path, secret path). Refuses to overwrite an existing pair unless `force`.
    """
    if not KEY_NAME.fullmatch(name):
        raise ConfigError(
            f"key name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64)",
            key="--name",
            hint="name a key pair after what holds it: coordinator, client, or a [[hosts]] name",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = out / f"{name}.public", out / f"{name}.secret"
    if not force and (public_path.exists() or secret_path.exists()):
        raise ConfigError(
            f"{secret_path} or {public_path} exists already",
            key="--name",
            hint="pick another --name, or pass --force to replace the pair (peers allowing the "
            "old public key will refuse the new one)",
        )
    public, secret = zmq.curve_keypair()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(secret_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is ignored for a file that existed
        f.write(secret + b"\n")
    public_path.write_bytes(public + b"\n")
    return public_path, secret_path


def read_public(keys_dir: str | Path | None, name: str) -> bytes:
    """The z85 public key `keys_dir/NAME.public` (40 bytes); ConfigError if missing or bad."""
    return _read_key(keys_dir, name, "public")


def read_secret(keys_dir: str | Path | None, name: str) -> bytes:
    """The z85 secret key `keys_dir/NAME.secret`; refused if others can read the file."""
    return _read_key(keys_dir, name, "secret")


def _read_key(keys_dir: str | Path | None, name: str, kind: str) -> bytes:
    if keys_dir is None:
        raise ConfigError(
            f"CURVE needs the key pair {name!r} but no keys folder is set",
            key="security.keys_dir",
            hint=KEYS_HINT,
        )
    path = Path(keys_dir) / f"{name}.{kind}"
    try:
        if kind == "secret" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: readable by others (mode {stat.S_IMODE(path.stat().st_mode):o})",
                key="security.keys_dir",
                hint=f"chmod 600 {path}",
            )
        text = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such key file", key="security.keys_dir", hint=KEYS_HINT) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc})", key="security.keys_dir") from None
    try:
        ok = len(text) == 40 and len(z85.decode(text)) == 32
    except (ValueError, KeyError, IndexError):
        ok = False
    if not ok:
        raise ConfigError(
            f"{path}: not a z85 CURVE key (expected 40 characters)",
            key="security.keys_dir",
            hint=KEYS_HINT,
        )
    return text


def check(config: MeshConfig) -> list[str]:
    """What stops `config`'s [security] from working, one line each ([] = ready): for
    `mesh-up --check`, without starting anything. Keys are needed when curve is "on", or
    "auto" with the coordinator or a host off loopback (unless allow_insecure_off_loopback)."""
    s = config.security
    addresses = [config.coordinator.host, *(h.address for h in config.hosts)]
    off_loopback = [a for a in addresses if not _loopback_host(a)]
    if s.curve == "off" or (s.curve == "auto" and not off_loopback):
        if off_loopback and not s.allow_insecure_off_loopback:
            return [f"security.curve is \"off\" but {', '.join(off_loopback)} is off loopback: "
                    "set curve = \"auto\" with keys_dir, or allow_insecure_off_loopback = true"]
        return []
    if s.keys_dir is None:
        if s.curve == "auto" and s.allow_insecure_off_loopback:
            return []
        return [f"security.keys_dir is not set; {KEYS_HINT}"]
    problems = []
    pairs = [s.coordinator_key, *(s.host_key(h.name) for h in config.hosts)]
    for name in dict.fromkeys([*pairs, *s.client_keys]):
        for read in (read_public, read_secret) if name in pairs else (read_public,):
            try:
                read(s.keys_dir, name)
            except ConfigError as exc:
                problems.append(f"{exc.message} ({exc.hint})")
    return problems


# ------------------------------------------------------------------------------ the settings


@dataclass(frozen=True)
class Setup:
    """What `secure` needs: the [security] settings, where the hosts are, and (for the SDK) the
    pair to dial with.

    hosts:    [[hosts]] name -> address (finds a worker's host, hence its key, by address)
    own_key:  the pair a dialling client uses (None: client_keys[0])
    wired:    False when the caller passed no [security] settings (the defaults apply)
    """

    settings: SecurityConfig = field(default_factory=SecurityConfig)
    hosts: Mapping[str, str] = field(default_factory=dict)
    own_key: str | None = None
    wired: bool = True

    def host_of(self, address: str | None) -> str | None:
        """The [[hosts]] name whose address is `address` (a lone host also stands for loopback)."""
        for name, host_address in self.hosts.items():
            if host_address == address:
                return name
        if len(self.hosts) == 1 and address is not None and _loopback_host(address):
            return next(iter(self.hosts))
        return None


def bundle(config: MeshConfig) -> dict[str, Any]:
    """The Setup of `config` as plain data (JSON / msgpack), for a process that does not get the
    whole MeshConfig: give it to that process as an object's `security` attribute."""
    s = config.security
    return {
        "settings": {
            **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
            "client_keys": list(s.client_keys),
            "host_keys": dict(s.host_keys),
        },
        "hosts": {h.name: h.address for h in config.hosts},
    }


def setup_of(owner: Any) -> Setup:
    """The Setup for a socket of `owner`: a MeshConfig, a SecurityConfig, a Setup, a `bundle()`
    dict, an object whose `security` attribute is one of those, or None (the defaults)."""
    if isinstance(owner, Setup):
        return owner
    if isinstance(owner, MeshConfig):
        return Setup(owner.security, {h.name: h.address for h in owner.hosts})
    if isinstance(owner, SecurityConfig):
        return Setup(owner)
    if isinstance(owner, Mapping) and "settings" in owner:
        return Setup(SecurityConfig(**owner["settings"]), dict(owner.get("hosts", {})))
    inner = getattr(owner, "security", None) if owner is not None else None
    if inner is not None and inner is not owner:
        return setup_of(inner)
    return Setup(wired=False)


# ----------------------------------------------------------------------------------- sockets


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (tcp to a loopback address, ipc, inproc).
    Wildcards ("*", "0.0.0.0"), interface names and host names count as off loopback."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    return _loopback_host(_address_of(endpoint))


def _address_of(endpoint: str) -> str:
    rest = endpoint.partition("://")[2].rpartition(";")[2]  # "src;dst" dials from src to dst
    return rest.rpartition(":")[0].strip("[]")


def _loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure(
    sock: zmq.Socket,
    role: str,
    owner: Any = None,
    *,
    bind: str | None = None,
    connect: str | None = None,
    host: str | None = None,
) -> bool:
    """Set CURVE on `sock` when the settings ask for it; returns whether it did.

    bind / connect: the endpoint the caller is about to bind or dial (call this before);
    host:           this process's host address (a [[hosts]] address), for the sockets of a
                    daemon or worker: which host's pair they use (default: the bound address).
    Raises ConfigError for an off-loopback bind without CURVE (unless allowed) and for missing
    or unreadable keys, naming the key to set.
    """
    if role not in DOMAINS:
        raise ValueError(f"secure: unknown socket role {role!r}; roles: {', '.join(DOMAINS)}")
    endpoint = bind or connect
    if endpoint is None:
        return False
    setup = setup_of(owner)
    if not setup.wired and bind is None:
        return False  # no keys to dial with: plain, and a CURVE server refuses it
    s = setup.settings
    local = is_loopback(endpoint)
    wanted = s.curve == "on" or (s.curve == "auto" and not local)
    if wanted and s.curve == "auto" and s.keys_dir is None and s.allow_insecure_off_loopback:
        wanted = False  # no keys, and plain traffic off loopback explicitly allowed
    if not wanted:
        if bind is not None and not local and not s.allow_insecure_off_loopback:
            raise _insecure_bind(role, bind, setup)
        return False
    if bind is not None and (not setup.wired or s.keys_dir is None):
        raise _insecure_bind(role, bind, setup)
    if bind is not None:
        _serve(sock, role, setup, bind, host)
    else:
        _dial(sock, role, setup, endpoint, host)
    return True


def _insecure_bind(role: str, bind: str, setup: Setup) -> ConfigError:
    s = setup.settings
    if not setup.wired:
        why = (
            "this process got no [security] settings, so it cannot use CURVE (its settings "
            "object needs a `security` attribute: mesh.security.bundle(config))"
        )
    elif s.curve == "off":
        why = 'security.curve is "off"'
    else:
        why = f'security.curve is "{s.curve}" but no CURVE keys are set (security.keys_dir)'
    where = "" if is_loopback(bind) else " off loopback"
    return ConfigError(
        f"refusing to bind the {role} socket at {bind}{where} without CURVE: {why}",
        key="security.keys_dir" if s.curve != "off" else "security.curve",
        hint=f"{KEYS_HINT} (curve = \"auto\" or \"on\"); or, on a network you trust, set "
        "security.allow_insecure_off_loopback = true",
    )


def _serve(sock: zmq.Socket, role: str, setup: Setup, bind: str, host: str | None) -> None:
    s = setup.settings
    if role in ("data", "workers"):
        pair = _host_pair_name(setup, host or _address_of(bind), f"the {role} socket at {bind}")
    else:
        pair = s.coordinator_key
    host_keys = [s.host_key(name) for name in setup.hosts] or list(s.host_keys.values())
    allowed_names = {
        "client": list(s.client_keys),
        "control": host_keys,
        "metrics": [*s.client_keys, *host_keys],
        "data": [s.coordinator_key],
        "workers": [pair],
    }[role]
    allowed = frozenset(read_public(s.keys_dir, name) for name in allowed_names)
    public, secret = read_public(s.keys_dir, pair), read_secret(s.keys_dir, pair)
    domain = DOMAINS[role]
    zap_handler(sock.context).allow(domain, allowed)  # up before this socket binds
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def _dial(sock: zmq.Socket, role: str, setup: Setup, endpoint: str, host: str | None) -> None:
    s = setup.settings
    client_pair = setup.own_key or (s.client_keys[0] if s.client_keys else None)
    if role in ("client", "metrics"):
        own, server = client_pair, s.coordinator_key
    elif role == "control":
        own, server = _host_pair_name(setup, host, "this daemon"), s.coordinator_key
    elif role == "data":
        own = s.coordinator_key
        server = _host_pair_name(setup, _address_of(endpoint), f"the worker at {endpoint}")
    else:  # workers: a worker dials its own daemon with its host's pair
        own = server = _host_pair_name(setup, host, "this worker")
    if own is None:
        raise ConfigError("no client key pair to dial with", key="security.client_keys",
                          hint=KEYS_HINT)
    sock.setsockopt(zmq.CURVE_SERVERKEY, read_public(s.keys_dir, server))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, read_public(s.keys_dir, own))
    sock.setsockopt(zmq.CURVE_SECRETKEY, read_secret(s.keys_dir, own))


def _host_pair_name(setup: Setup, address: str | None, what: str) -> str:
    name = setup.host_of(address)
    if name is None:
        known = ", ".join(f"{n} ({a})" for n, a in setup.hosts.items()) or "none"
        raise ConfigError(
            f"{what}: no [[hosts]] entry has address {address!r}, so its key pair is unknown "
            f"(hosts: {known})",
            key="hosts",
            hint="give the host's [[hosts]] address exactly as its sockets bind it",
        )
    return setup.settings.host_key(name)


# ------------------------------------------------------------------------------------- ZAP


class ZapHandler(threading.Thread):
    """The ZAP handler of one ZeroMQ context: allows CURVE clients by (domain, public key).

    `allow(domain, keys)` adds z85 public keys to a domain. Counters `accepted` / `refused`
    count handshakes answered. The thread ends when its context terminates.
    """

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(name="moemesh-zap", daemon=True)
        self.allowed: dict[str, frozenset[bytes]] = {}
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        # Bound here, on the caller's thread, so that it is up before the caller's bind. Made
        # outside the context's socket list, so that a Context.destroy() on another thread does
        # not close it under this one (zmq_close is not thread-safe): ETERM ends it instead.
        self.sock = zmq.Socket(context, zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # ZAP requests carry a 32-byte key
        self.sock.bind(ZAP_ENDPOINT)

    def allow(self, domain: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            self.allowed[domain] = self.allowed.get(domain, frozenset()) | frozenset(keys)

    def run(self) -> None:
        try:
            while True:
                try:
                    request = self.sock.recv_multipart()
                    self.sock.send_multipart(self.reply(request))
                except zmq.ContextTerminated:
                    return
        finally:
            self.sock.close(linger=0)

    def reply(self, request: list[bytes]) -> list[bytes]:
        """The ZAP 1.0 reply to one request (RFC 27): 200 for an allowed CURVE key, else 400."""
        if len(request) < 6:
            self.refused += 1
            request_id = request[1] if len(request) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism, *credentials = request
        with self._lock:
            allowed = self.allowed.get(domain.decode("utf-8", "replace"))
        key = z85.encode(credentials[0]) if len(credentials) == 1 and len(credentials[0]) == 32 else b""
        if version != b"1.0" or mechanism != b"CURVE" or allowed is None or key not in allowed:
            self.refused += 1
            why = b"unknown domain" if allowed is None else b"key not allowed"
            return [b"1.0", request_id, b"400", why, b"", b""]
        self.accepted += 1
        return [b"1.0", request_id, b"200", b"OK", key, b""]


_HANDLERS: weakref.WeakKeyDictionary[zmq.Context, ZapHandler] = weakref.WeakKeyDictionary()
_HANDLERS_LOCK = threading.Lock()


def zap_handler(context: zmq.Context) -> ZapHandler:
    """The context's ZAP handler, started on first use."""
    with _HANDLERS_LOCK:
        handler = _HANDLERS.get(context)
        if handler is None or not handler.is_alive():
            handler = ZapHandler(context)
            handler.start()
            _HANDLERS[context] = handler
        return handler
