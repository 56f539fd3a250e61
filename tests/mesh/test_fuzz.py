"""Fuzzing beyond tests/mesh/test_protocol.py (which fuzzes random bytes, random headers and
random field values): mutations of every valid message, pickle payloads, frames far over the
limits, and then the same thrown at the sockets of a real running mesh. Nothing may crash: the
decoders raise only typed ProtocolErrors, the servers answer typed errors or drop the frame,
golden requests still give the reference tokens, and the coordinator's memory comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.protocol import (
    DEFAULT_LIMITS,
    CancelRequest,
    GenerateRequest,
    MsgType,
    OversizedMessage,
    Ping,
    Pong,
    ProtocolError,
    StatusRequest,
    decode,
    encode,
    message_types,
)
from tests.mesh.conftest import PROMPTS, dump, running_mesh
from tests.mesh.test_mesh_e2e import generate_all, status
from tests.mesh.test_protocol import SAMPLES, expert_call

# database=None: no .hypothesis/ folder in the work tree; failures print their reproducer.
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Pickles as an attacker would send them (never unpickled here: the bytes are written out).
PICKLES = [
    b"cos\nsystem\n(S'echo pwned'\ntR.",  # protocol 0: os.system("echo pwned")
    b"\x80\x02cposix\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.",  # protocol 2
    b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",  # protocol 5: {"a": 1}
]
TYPE_BYTES = sorted(message_types())


# ------------------------------------------------------------------------------- mutations

Mutation = Callable[[st.DataObject, list[bytes]], list[bytes]]


def _index(data: st.DataObject, frames: list[bytes]) -> int:
    return data.draw(st.integers(0, max(0, len(frames) - 1)))


def _flip(data, frames):
    i = _index(data, frames)
    if not frames or not frames[i]:
        return frames
    body = bytearray(frames[i])
    j = data.draw(st.integers(0, len(body) - 1))
    body[j] ^= data.draw(st.integers(1, 255))
    return [*frames[:i], bytes(body), *frames[i + 1:]]


def _truncate(data, frames):
    i = _index(data, frames)
    if not frames:
        return frames
    return [*frames[:i], frames[i][: data.draw(st.integers(0, len(frames[i])))], *frames[i + 1:]]


def _extend(data, frames):
    i = _index(data, frames)
    if not frames:
        return frames
    return [*frames[:i], frames[i] + data.draw(st.binary(min_size=1, max_size=64)), *frames[i + 1:]]


def _drop(data, frames):
    i = _index(data, frames)
    return frames[:i] + frames[i + 1:]


def _duplicate(data, frames):
    i = _index(data, frames)
    return frames[: i + 1] + frames[i:]


def _swap(data, frames):
    i, j = _index(data, frames), _index(data, frames)
    out = list(frames)
    if out:
        out[i], out[j] = out[j], out[i]
    return out


def _pickle(data, frames):
    i = _index(data, frames)
    payload = data.draw(st.sampled_from(PICKLES))
    return [*frames[:i], payload, *frames[i + 1:]] if frames else [payload]


def _retype(data, frames):
    code = bytes([data.draw(st.sampled_from(TYPE_BYTES))])
    return [code, *frames[1:]]


def _insert(data, frames):
    i = data.draw(st.integers(0, len(frames)))
    return [*frames[:i], data.draw(st.binary(max_size=64)), *frames[i:]]


def _header_value(data, frames):
    """One header entry replaced by a value of another type or size (when it is a map)."""
    try:
        header = msgpack.unpackb(frames[1], raw=False)
    except Exception:  # not a header (any more): nothing to change  # noqa: BLE001
        return frames
    if not isinstance(header, dict) or not header:
        return frames
    key = data.draw(st.sampled_from(sorted(header, key=str)))
    header[key] = data.draw(st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
        st.text(max_size=8), st.binary(max_size=8), st.just([0] * 100), st.just({"x": {"y": [1]}}),
        st.just(2**63), st.just(float("nan")), st.just(-1), st.just(""),
    ))
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


MUTATIONS: list[Mutation] = [_flip, _truncate, _extend, _drop, _duplicate, _swap, _pickle, _retype,
                             _insert, _header_value]


def mutate(data: st.DataObject, seeds: list) -> list[bytes]:
    """A valid message of `seeds`, then 1 to 4 mutations."""
    frames = [bytes(f) for f in encode(data.draw(st.sampled_from(seeds)))]
    for _ in range(data.draw(st.integers(1, 4))):
        frames = data.draw(st.sampled_from(MUTATIONS))(data, frames)
    return frames


def decodes_or_refuses(frames: list) -> None:
    """decode() gives a message or a typed ProtocolError; anything else fails the test."""
    try:
        decode(frames)
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------ the decoders


@FUZZ
@given(st.data())
def test_mutated_messages_only_raise_protocol_errors(data: st.DataObject) -> None:
    decodes_or_refuses(mutate(data, SAMPLES))


@FUZZ
@given(st.sampled_from(PICKLES), st.sampled_from([None, *TYPE_BYTES]), st.integers(0, 2))
def test_pickle_payloads_are_refused(payload: bytes, code: int | None, where: int) -> None:
    """A pickle as the header, as a tensor frame, or as the whole message."""
    frames = [payload] if code is None else [bytes([code]), payload, payload][: where + 1]
    with pytest.raises(ProtocolError):
        decode(frames)


HUGE_COUNT = 100_000


@pytest.mark.parametrize("case", [
    "frames", "many frames", "header", "big header", "tensor claim", "tensor frame", "dimension",
    "string", "list", "depth",
])
def test_frames_far_over_the_limits_are_oversized_or_malformed(case: str) -> None:
    limits = DEFAULT_LIMITS
    ping = encode(Ping(seq=1))
    call = [bytes(f) for f in encode(expert_call())]

    def header_of(frames, **changes):
        header = msgpack.unpackb(frames[1], raw=False)
        header.update(changes)
        return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]

    frames = {
        "frames": [*ping, *([b""] * limits.max_frames)],
        "many frames": [*ping, *([b"x"] * HUGE_COUNT)],
        "header": [ping[0], b"\x00" * (limits.max_header_bytes + 1)],
        "big header": [bytes([MsgType.GENERATE_REQUEST]), b"\x00" * (limits.max_big_header_bytes + 1)],
        "tensor claim": header_of(call, tensors=[{"dtype": "float32", "shape": [1 << 40, 32]}]),
        "tensor frame": header_of(call, tensors=[{"dtype": "float32", "shape": [1 << 20, 17]}]),
        "dimension": [*header_of(call, tensors=[{"dtype": "float32", "shape": [0, 2**64 - 1]}])[:2], b""],
        "string": header_of([bytes(f) for f in encode(CancelRequest("r"))],
                            request_id="x" * (limits.max_str_len + 1)),
        "list": [bytes([MsgType.GENERATE_REQUEST]), msgpack.packb(
            {"request_id": "r", "prompt": "", "max_new_tokens": 1, "prompt_ids": [1] * (limits.max_prompt_tokens + 1)})],
        "depth": [bytes([MsgType.STATUS_REPLY]), b"\x81\xa6status" + b"\x81\xa1a" * 100_000 + b"\xc0"],
    }[case]
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    if case not in ("depth",):
        assert isinstance(err.value, OversizedMessage), err.value


# ------------------------------------------------------------------- the sockets of a mesh

CLIENT_SEEDS = [Ping(seq=3), StatusRequest(), CancelRequest("no-such-request"), *[
    m for m in SAMPLES if not isinstance(m, GenerateRequest)]]  # a valid request is no fuzz
CONTROL_SEEDS = [m for m in SAMPLES if m.TYPE != MsgType.NODE_REGISTER]  # an intruder never registers
DATA_SEEDS = [expert_call(), Ping(seq=5), *SAMPLES]
OVER = 80 * 1024 * 1024  # beyond every socket's MAXMSGSIZE (data: 64 MiB + 64 KiB on a worker)


class Prober:
    """One DEALER per target socket; the fuzz sends and never waits for answers."""

    def __init__(self, context: zmq.Context, endpoint: str, identity: bytes) -> None:
        self.context, self.endpoint, self.identity = context, endpoint, identity
        self.dealers = 0
        self.sock = self._dealer()
        self.sent = 0

    def _dealer(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a fuzz frame on our side
        self.dealers += 1  # a ROUTER ignores a second peer with an identity in use
        sock.setsockopt(zmq.IDENTITY, self.identity + b"-%d" % self.dealers)
        sock.connect(self.endpoint)
        return sock

    def send(self, frames: list[bytes]) -> None:
        if not frames:
            frames = [b""]
        self.sock.send_multipart(frames)
        self.sent += 1

    def oversized(self) -> None:
        """A frame far over the socket's limit, on its own connection (ZeroMQ drops it)."""
        sock = self._dealer()
        sock.send_multipart([bytes([MsgType.PING]), b"\x00" * OVER])
        sock.close(linger=2000)  # long enough for the frame's start to reach the peer

    def ping(self, timeout_ms: int = 30_000) -> bool:
        """A fresh connection's Ping answered by Pong: the peer serves and kept its order."""
        sock = self._dealer()
        try:
            sock.send_multipart(encode(Ping(seq=424242)))
            while sock.poll(timeout_ms):
                reply = decode(sock.recv_multipart())
                if isinstance(reply, Pong) and reply.seq == 424242:
                    return True
            return False
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self.sock.close(linger=2000)


def fuzz_socket(prober: Prober, seeds: list) -> None:
    """A few hundred mutated, random and pickle messages at one socket."""

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["mutated", "random", "pickle"]))
        if kind == "mutated":
            prober.send(mutate(data, seeds))
        elif kind == "random":
            prober.send(data.draw(st.lists(st.binary(max_size=256), min_size=1, max_size=20)))
        else:
            prober.send([bytes([data.draw(st.sampled_from(TYPE_BYTES))]),
                         data.draw(st.sampled_from(PICKLES))])

    fuzz()


@pytest.mark.slow
def test_fuzzed_sockets_of_a_running_mesh(tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote"}) as mesh:
        client_ep, control_ep = mesh.endpoints["client"], mesh.endpoints["control"]
        assert [t for t, _ in asyncio.run(generate_all(client_ep, PROMPTS[:2]))] == reference[:2]
        coordinator = psutil.Process(mesh.coordinator.pid)
        rss_start = coordinator.memory_info().rss
        worker = next(i for i in asyncio.run(status(client_ep))["instances"] if i["state"] == "warm")

        context = zmq.Context()
        probers = {
            "client": Prober(context, client_ep, b"fuzz-client"),
            "control": Prober(context, control_ep, b"fuzz-intruder"),
            "data": Prober(context, worker["endpoint"], b"fuzz-caller"),
        }
        seeds = {"client": CLIENT_SEEDS, "control": CONTROL_SEEDS, "data": DATA_SEEDS}
        try:
            for name, prober in probers.items():
                fuzz_socket(prober, seeds[name])
                prober.send([*encode(Ping(seq=1)), *([b"x" * 1024] * 2000)])  # 2,000 frames
                prober.oversized()
            for name in ("client", "data"):  # these answer Ping: each served all it was sent
                assert probers[name].ping(), f"{name} socket stopped answering\n{dump(mesh)}"
            results = asyncio.run(generate_all(client_ep))  # golden requests still pass
            assert [t for t, _ in results] == reference, dump(mesh)
            st_after = asyncio.run(status(client_ep))
        finally:
            for prober in probers.values():
                prober.close()
            context.term()
        assert mesh.coordinator.poll() is None, "the coordinator died"
        assert psutil.pid_exists(worker["pid"]), "the fuzzed worker died"
        assert not [n for n in st_after["nodes"] if n["name"].startswith("fuzz")], st_after["nodes"]
        rss_end = coordinator.memory_info().rss
        print(f"coordinator RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB after "
              f"{sum(p.sent for p in probers.values())} fuzz messages")
        assert rss_end <= 1.10 * rss_start, f"coordinator RSS {rss_start >> 20} -> {rss_end >> 20} MiB"
        folders = {folder for folder in (mesh.log_dir, mesh.run_dir) if folder is not None}
        logs = {str(f): f.read_text() for folder in folders for f in sorted(folder.rglob("*.log"))}
        print("logs checked:", ", ".join(sorted(Path(name).name for name in logs)))
        crashed = [name for name, text in logs.items() if "Traceback" in text]
        assert not crashed, "unexpected exceptions:\n" + "\n".join(logs[n][-3000:] for n in crashed)
