"""mesh.security and mesh.sockets: key files, the [security] table, bounded sockets, CURVE + ZAP
on real loopback sockets (curve = "on"), refusal of insecure off-loopback binds, and a grep of
the source tree for unsafe deserialisation."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from mesh import sockets
from mesh.cli import main as cli_main
from mesh.client import MeshClient
from mesh.config import MeshConfig, SecurityConfig, load_config
from mesh.errors import ConfigError, MeshUnavailable
from mesh.protocol import DEFAULT_LIMITS, Ping, Pong, decode, encode
from mesh.security import (
    ZapHandler,
    bundle,
    check,
    is_loopback,
    make_keys,
    read_public,
    read_secret,
)
from mesh.sockets import harden, limits_for

REPO = Path(__file__).resolve().parents[2]
DEADLINE_MS = 30_000  # generous: only reached when something is broken
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """coordinator, client and a host "local" pair; "stranger" is a pair nobody allows."""
    out = tmp_path / "keys"
    for name in ("coordinator", "client", "local", "stranger"):
        make_keys(out, name)
    return out


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def curve_on(keys: Path) -> MeshConfig:
    return load_config(None, {"security.curve": "on", "security.keys_dir": str(keys)})


# --------------------------------------------------------------------------------- key files


def test_keys_cli_writes_a_z85_pair_with_a_private_secret(tmp_path: Path, capsys) -> None:
    assert cli_main(["keys", "--out", str(tmp_path / "k"), "--name", "coordinator", "--name", "h1"]) == 0
    for name in ("coordinator", "h1"):
        secret = tmp_path / "k" / f"{name}.secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert len(read_public(tmp_path / "k", name)) == 40 and len(read_secret(tmp_path / "k", name)) == 40
    assert cli_main(["keys", "--out", str(tmp_path / "k"), "--name", "h1"]) == 2  # no overwrite
    assert "--force" in capsys.readouterr().err


def test_a_secret_readable_by_others_is_refused(keys: Path) -> None:
    os.chmod(keys / "client.secret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret(keys, "client")


def test_missing_and_garbage_keys_name_the_key_to_set(keys: Path) -> None:
    with pytest.raises(ConfigError) as err:
        read_public(keys, "nobody")
    assert err.value.key == "security.keys_dir" and "moemesh keys" in err.value.hint
    (keys / "bad.public").write_text("not a key\n")
    with pytest.raises(ConfigError, match="z85"):
        read_public(keys, "bad")
    with pytest.raises(ConfigError, match="no keys folder"):
        read_public(None, "client")


# ------------------------------------------------------------------------------ the settings


def test_security_table_loads_and_checks_host_names(tmp_path: Path) -> None:
    toml = tmp_path / "launch.toml"
    toml.write_text('[security]\ncurve = "on"\nkeys_dir = "keys"\n[security.host_keys]\nlocal = "h"\n')
    config = load_config(toml)
    assert config.security.curve == "on"
    assert config.security.keys_dir == str(tmp_path / "keys")  # relative to the file
    assert config.security.host_key("local") == "h"
    with pytest.raises(ConfigError, match="no host"):
        load_config(None, {"security.host_keys": {"elsewhere": "x"}})
    with pytest.raises(ConfigError, match="one of"):
        load_config(None, {"security.curve": "maybe"})
    assert MeshConfig.from_dict(config.to_dict()) == config  # travels to daemons as JSON


def test_check_says_what_stops_security_without_starting_anything(tmp_path: Path, keys: Path) -> None:
    assert check(MeshConfig()) == []  # everything on loopback: nothing needed
    remote = {"coordinator.host": "10.0.0.1"}
    assert "keys_dir is not set" in check(load_config(None, remote))[0]
    assert "off loopback" in check(load_config(None, {**remote, "security.curve": "off"}))[0]
    assert check(load_config(None, {**remote, "security.keys_dir": str(keys)})) == []
    (keys / "local.secret").unlink()
    problems = check(load_config(None, {**remote, "security.keys_dir": str(keys)}))
    assert len(problems) == 1 and "local.secret" in problems[0]


def test_loopback_endpoints() -> None:
    for endpoint in ("tcp://127.0.0.1:1", "tcp://127.1.2.3:0", "tcp://[::1]:5", "tcp://localhost:1",
                     "ipc:///tmp/x", "inproc://y"):
        assert is_loopback(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://10.0.0.2:1", "tcp://eth0:1",
                     "tcp://example.org:1", "tcp://127.0.0.1;10.0.0.2:5"):
        assert not is_loopback(endpoint), endpoint


def test_off_loopback_bind_without_curve_is_refused_unless_allowed(context, keys: Path) -> None:
    sock = context.socket(zmq.ROUTER)
    off = load_config(None, {"security.curve": "off"})
    with pytest.raises(ConfigError) as err:
        harden(sock, "client", off, bind="tcp://0.0.0.0:0")
    assert err.value.key == "security.curve" and "allow_insecure_off_loopback" in err.value.hint
    with pytest.raises(ConfigError) as err:  # auto, but no keys
        harden(sock, "control", MeshConfig(), bind="tcp://10.1.2.3:0")
    assert err.value.key == "security.keys_dir"
    with pytest.raises(ConfigError, match="no \\[security\\] settings"):  # a process never told
        harden(sock, "data", None, bind="tcp://0.0.0.0:0")
    allowed = load_config(None, {"security.curve": "off", "security.allow_insecure_off_loopback": True})
    harden(sock, "client", allowed, bind="tcp://0.0.0.0:0")
    assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
    auto = load_config(None, {"security.keys_dir": str(keys)})
    harden(sock, "client", auto, bind="tcp://0.0.0.0:0")  # auto + keys: CURVE off loopback
    assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    plain = context.socket(zmq.ROUTER)
    harden(plain, "client", auto, bind="tcp://127.0.0.1:0")  # auto on loopback: plain
    assert plain.getsockopt(zmq.MECHANISM) == zmq.NULL


# ------------------------------------------------------------------------------ socket limits


def test_socket_limits_follow_the_protocol_and_the_payload_cap(context) -> None:
    assert sockets._HEADER == DEFAULT_LIMITS.max_header_bytes
    assert sockets._BIG_HEADER == DEFAULT_LIMITS.max_big_header_bytes
    assert sockets._TENSOR == DEFAULT_LIMITS.max_tensor_bytes
    config = MeshConfig()
    assert limits_for("client", config).max_frame_bytes == DEFAULT_LIMITS.max_big_header_bytes
    assert limits_for("metrics", config, server=True).max_frame_bytes == DEFAULT_LIMITS.max_header_bytes
    cap = config.policy.payload_cap_bytes
    assert limits_for("data", config).max_frame_bytes == 2 * cap + DEFAULT_LIMITS.max_header_bytes
    worker = limits_for("data", None).max_frame_bytes  # a worker knows no payload cap
    assert worker == DEFAULT_LIMITS.max_tensor_bytes + DEFAULT_LIMITS.max_header_bytes
    sock = harden(context.socket(zmq.ROUTER), "client", config, bind="tcp://127.0.0.1:0")
    assert sock.getsockopt(zmq.MAXMSGSIZE) == DEFAULT_LIMITS.max_big_header_bytes
    assert sock.getsockopt(zmq.SNDHWM) > 0 and sock.getsockopt(zmq.RCVHWM) > 0
    with pytest.raises(ValueError, match="unknown socket role"):
        harden(context.socket(zmq.DEALER), "nonsense")


def test_a_frame_over_the_limit_is_dropped_with_its_peer(context) -> None:
    server = harden(context.socket(zmq.ROUTER), "workers", bind="tcp://127.0.0.1:0")
    server.setsockopt(zmq.MAXMSGSIZE, 1024)  # small, so that the test sends little
    server.bind("tcp://127.0.0.1:0")
    endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = server.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    big = context.socket(zmq.DEALER)
    big.connect(endpoint)
    big.send(b"x" * 4096)
    assert monitor.poll(DEADLINE_MS), "the oversized peer was not dropped"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    small = context.socket(zmq.DEALER)
    small.connect(endpoint)
    small.send(b"ok")
    assert server.poll(DEADLINE_MS)
    assert server.recv_multipart()[1:] == [b"ok"]  # the only message that arrived
    assert server.poll(0) == 0


# ------------------------------------------------------------------------------ CURVE + ZAP


def _handshake_events(sock: zmq.Socket) -> zmq.Socket:
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)


def _next_handshake(monitor: zmq.Socket) -> int:
    assert monitor.poll(DEADLINE_MS), "no handshake outcome"
    return recv_monitor_message(monitor)["event"]


def _until_success(monitor: zmq.Socket) -> None:
    """Skip the failures of refused peers' retries up to the next successful handshake."""
    while _next_handshake(monitor) != zmq.EVENT_HANDSHAKE_SUCCEEDED:
        pass


def _dealer(context, keys: Path | None, own: str | None, server_key: str | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if own is not None:
        sock.curve_serverkey = read_public(keys, server_key)
        sock.curve_publickey = read_public(keys, own)
        sock.curve_secretkey = read_secret(keys, own)
    return sock


def test_curve_refuses_unknown_keys_no_keys_and_the_wrong_server_key(context, keys: Path) -> None:
    config = curve_on(keys)
    server = harden(context.socket(zmq.ROUTER), "client", config, bind="tcp://127.0.0.1:0")
    server.setsockopt(zmq.LINGER, 0)
    server.bind("tcp://127.0.0.1:0")
    endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = _handshake_events(server)
    refused = {
        "unknown key": _dealer(context, keys, "stranger", "coordinator"),
        "no keys": _dealer(context, None, None, None),
        "wrong server key": _dealer(context, keys, "client", "stranger"),
    }
    for what, sock in refused.items():
        sock.connect(endpoint)
        _offer(sock, what.encode())  # queued: goes out only if the handshake succeeds
        assert _next_handshake(monitor) & HANDSHAKE_FAILED, what
        sock.disconnect(endpoint)  # no reconnect attempts that the monitor would report
    good = context.socket(zmq.DEALER)
    good.setsockopt(zmq.LINGER, 0)
    harden(good, "client", config, connect=endpoint)  # the client pair, the coordinator's key
    good.connect(endpoint)
    good.send(b"known key")
    _until_success(monitor)
    assert server.poll(DEADLINE_MS)
    assert server.recv_multipart()[1:] == [b"known key"]
    assert server.poll(0) == 0  # the refused clients delivered nothing
    assert server.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1


def _offer(sock: zmq.Socket, payload: bytes) -> None:
    """Queue a message if the socket has a pipe, never block: once a refused handshake has torn
    the pipe down a DEALER has no peer, and a blocking send would wait forever (a loaded machine
    makes that race likely). Either way the server must receive nothing."""
    try:
        sock.send(payload, zmq.NOBLOCK)
    except zmq.Again:
        pass


def test_workers_serve_with_their_hosts_key_and_allow_only_the_coordinator(context, keys: Path) -> None:
    """The executor -> worker data path: the worker's host pair found from its address."""
    security = {"security": bundle(curve_on(keys))}  # what a worker's spec would carry
    worker = harden(context.socket(zmq.ROUTER), "data", type("Spec", (), security)(),
                    bind="tcp://127.0.0.1:0")
    worker.bind("tcp://127.0.0.1:0")
    endpoint = worker.getsockopt_string(zmq.LAST_ENDPOINT)
    monitor = _handshake_events(worker)
    client_pair = _dealer(context, keys, "client", "local")  # a client is not the coordinator
    client_pair.connect(endpoint)
    _offer(client_pair, b"intruder")
    assert _next_handshake(monitor) & HANDSHAKE_FAILED
    client_pair.disconnect(endpoint)
    # the executor dials with the coordinator's pair and expects the host "local"'s public key
    executor = harden(context.socket(zmq.DEALER), "data", curve_on(keys), connect=endpoint)
    executor.connect(endpoint)
    executor.send_multipart(encode(Ping(seq=1)))
    assert worker.poll(DEADLINE_MS)
    identity, *frames = worker.recv_multipart()
    assert decode(frames) == Ping(seq=1) and worker.poll(0) == 0


def test_zap_handler_enforces_domain_and_mechanism(context, keys: Path) -> None:
    handler = ZapHandler(context)
    try:
        key = read_public(keys, "client")
        handler.allow("moemesh-client", [key])
        from zmq.utils import z85

        raw = z85.decode(key)
        ok = handler.reply([b"1.0", b"7", b"moemesh-client", b"", b"", b"CURVE", raw])
        assert ok[2] == b"200" and ok[4] == key
        assert handler.reply([b"1.0", b"8", b"moemesh-data", b"", b"", b"CURVE", raw])[2] == b"400"
        assert handler.reply([b"1.0", b"9", b"moemesh-client", b"", b"", b"NULL"])[2] == b"400"
        assert handler.reply([b"1.0"])[2] == b"500"
    finally:
        handler.sock.close(linger=0)


def test_a_context_with_a_zap_handler_still_terminates(keys: Path) -> None:
    ctx = zmq.Context()
    sock = harden(ctx.socket(zmq.ROUTER), "control", curve_on(keys), bind="tcp://127.0.0.1:0")
    sock.bind("tcp://127.0.0.1:0")
    sock.close(linger=0)
    done = threading.Event()
    threading.Thread(target=lambda: (ctx.term(), done.set()), daemon=True).start()
    assert done.wait(DEADLINE_MS / 1000), "Context.term() hung on the ZAP handler"


def test_sdk_with_keys_talks_curve_and_a_refused_client_gets_mesh_unavailable(keys: Path) -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        server = ctx.socket(zmq.ROUTER)
        harden(server, "client", curve_on(keys), bind="tcp://127.0.0.1:0")
        server.setsockopt(zmq.LINGER, 0)
        server.bind("tcp://127.0.0.1:0")
        endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)

        async def pong() -> None:
            while True:
                identity, *frames = await server.recv_multipart()
                await server.send_multipart([identity, *encode(Pong(seq=decode(frames).seq))])

        task = asyncio.create_task(pong())
        try:
            async with MeshClient(endpoint, context=ctx, keys_dir=keys) as client:
                assert await client.ping() >= 0
            with pytest.raises(MeshUnavailable) as err:  # refused: can only end by its timeout
                async with MeshClient(endpoint, context=ctx, keys_dir=keys, key="stranger",
                                      connect_timeout_s=1.0):
                    pass
            assert "CURVE" in err.value.hint
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close(linger=0)
            ctx.term()

    asyncio.run(run())


def test_sdk_without_keys_stays_plain() -> None:
    setup = MeshClient("tcp://10.9.9.9:1").security
    assert setup.settings == SecurityConfig(curve="off", coordinator_key="coordinator",
                                            client_keys=("client",), allow_insecure_off_loopback=True)


# -------------------------------------------------------------------------- no unsafe decoding

UNSAFE = re.compile(
    r"\bimport\s+(c?pickle|marshal|dill|shelve)\b|\bfrom\s+(c?pickle|marshal|dill|shelve)\s+import\b"
    r"|\b(c?pickle|marshal|dill|shelve)\.\w+\(|\brecv_pyobj\b|\bsend_pyobj\b|\brecv_serialized\b"
    r"|\bnumpy\.load\([^)]*allow_pickle\s*=\s*True|\bnp\.load\([^)]*allow_pickle\s*=\s*True"
)
TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def test_no_pickle_marshal_or_pyobj_anywhere_in_the_source() -> None:
    for bad in ("import pickle", "from marshal import loads", "pickle.loads(b)", "s.recv_pyobj()",
                "np.load(f, allow_pickle=True)"):
        assert UNSAFE.search(bad), bad  # the patterns catch what they are for
    assert not UNSAFE.search("# no pickle, ever") and not UNSAFE.search("unpickled = 1")
    found = []
    for folder in ("mesh", "nodes", "predictor", "allocator", "tui"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            for number, line in enumerate(text.splitlines(), 1):
                if UNSAFE.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            for match in TORCH_LOAD.finditer(text):  # the call may span lines: read to its ")"
                call = text[match.start(): text.find(")", match.end()) + 1]
                if "weights_only=True" not in call.replace(" ", ""):
                    number = text.count("\n", 0, match.start()) + 1
                    found.append(f"{path.relative_to(REPO)}:{number}: torch.load without weights_only=True")
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


def test_plain_loopback_sockets_share_a_context_with_a_zap_handler(context, keys: Path) -> None:
    """A NULL-mechanism socket sets no ZAP domain, so the handler never sees (or refuses) it."""
    curve = harden(context.socket(zmq.ROUTER), "client", curve_on(keys), bind="tcp://127.0.0.1:0")
    curve.bind("tcp://127.0.0.1:0")
    plain = harden(context.socket(zmq.ROUTER), "control", MeshConfig(), bind="tcp://127.0.0.1:0")
    plain.bind("tcp://127.0.0.1:0")
    dealer = harden(context.socket(zmq.DEALER), "control", MeshConfig(),
                    connect=plain.getsockopt_string(zmq.LAST_ENDPOINT))
    dealer.connect(plain.getsockopt_string(zmq.LAST_ENDPOINT))
    dealer.send(b"plain")
    assert plain.poll(DEADLINE_MS) and plain.recv_multipart()[1:] == [b"plain"]


IN_PROCESS_ONLY: set[tuple[str, str]] = set()  # (file, socket type) made only for inproc://


def test_every_zmq_socket_is_hardened_where_it_is_made() -> None:
    """Each `.socket(zmq.X)` in the source is followed within 6 lines by a harden() call."""
    missing = []
    for folder in ("mesh", "nodes", "tui"):
        for path in sorted((REPO / folder).rglob("*.py")):
            name = str(path.relative_to(REPO))
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                made = re.search(r"\.socket\((zmq\.\w+)", line)
                if not made or name in ("mesh/security.py", "mesh/sockets.py") or line.lstrip().startswith("#"):
                    continue
                if (name, made.group(1)) in IN_PROCESS_ONLY:
                    continue
                if not any("harden(" in after for after in lines[number: number + 7]):
                    missing.append(f"{name}:{number + 1}: {line.strip()}")
    assert not missing, "sockets without mesh.sockets.harden():\n" + "\n".join(missing)


def test_a_whole_mesh_runs_under_curve_and_refuses_a_keyless_client(tiny_model, reference, keys, tmp_path) -> None:
    """Every socket of a real mesh (client, control, metrics, workers' data) under CURVE: the
    daemons, workers and the executor use the keys launch.toml names; tokens are unchanged."""
    import asyncio

    from mesh.client import MeshClient
    from mesh.errors import MeshError
    from tests.mesh.conftest import PROMPTS, dump, running_mesh

    overrides = {"security.curve": "on", "security.keys_dir": str(keys)}
    with running_mesh(tiny_model, tmp_path, **overrides) as mesh:
        address = mesh.endpoints["client"]

        async def keyed():
            async with MeshClient.from_config(address, mesh.config, timeout_s=60) as client:
                gen = client.generate("", prompt_ids=PROMPTS[0], max_new_tokens=12, stop_at_eos=False)
                tokens = [t.token_id async for t in gen]
                return tokens, await client.status()

        tokens, st = asyncio.run(keyed())
        assert tokens == reference[0], dump(mesh)
        assert st["data_plane"]["replies"] > 0  # the remote experts answered over CURVE

        async def keyless():
            async with MeshClient(address, timeout_s=3, connect_timeout_s=3) as client:
                await client.status()

        with pytest.raises(MeshError):
            asyncio.run(keyless())

        async def dashboard_feed():  # the TUI's SUB dials the meter's PUB with the config's keys
            from tui.feed import Snapshot, ZmqFeed

            async for event in ZmqFeed(mesh.endpoints["metrics"], interval=0.5, config=mesh.config):
                if isinstance(event, Snapshot):
                    return event.payload

        snapshot = asyncio.run(asyncio.wait_for(dashboard_feed(), 60))
        assert snapshot["data_plane"]["replies"] > 0

        async def http_front_end(config):  # the HTTP front end's link to the coordinator
            import aiohttp

            from mesh.http.app import make_app
            from tests.mesh.test_http import _serve

            runner, url = await _serve(make_app(address, "tiny", config=config))
            try:
                async with aiohttp.ClientSession() as session, session.get(url + "/health") as r:
                    return r.status
            finally:
                await runner.cleanup()

        assert asyncio.run(http_front_end(mesh.config)) == 200  # dials with the config's keys
        assert asyncio.run(http_front_end(None)) == 503  # keyless: refused by the coordinator
