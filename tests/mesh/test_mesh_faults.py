"""Faults, with real processes: a worker killed mid-generation, malformed frames on every socket."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
import torch
import zmq

from mesh.client import MeshClient
from mesh.errors import MalformedFrame, RequestRejected, UnknownMessageType
from mesh.protocol import ErrorReply, ExpertCall, WorkerError, decode, encode
from nodes.model.checkpoint import Checkpoint
from nodes.model.engine import Engine, SamplingParams
from tests.mesh.conftest import PROMPTS, dump, running_mesh
from tests.mesh.test_mesh_e2e import generate_all, status

LONG = 40


def test_kill_9_worker_mid_generation(tiny_model, tmp_path):
    expected = Engine(Checkpoint(tiny_model).load_model()).complete(
        PROMPTS[:2], SamplingParams(max_new_tokens=LONG, stop_at_eos=False))
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote"}) as mesh:
        address = mesh.endpoints["client"]

        async def run():
            async with MeshClient(address, timeout_s=60) as client:
                gens = [client.generate("", prompt_ids=p, max_new_tokens=LONG, stop_at_eos=False) for p in PROMPTS[:2]]
                streams = [g.__aiter__() for g in gens]
                got = [[(await s.__anext__()).token_id for _ in range(3)] for s in streams]  # mid-generation
                st = await client.status()
                victim = max((i for i in st["instances"] if i["state"] == "warm"), key=lambda i: i["invocations"])
                os.kill(victim["pid"], signal.SIGKILL)
                for tokens, stream in zip(got, streams, strict=True):
                    tokens += [t.token_id async for t in stream]
                return got, victim, gens

        got, victim, gens = asyncio.run(run())
        assert got == expected, dump(mesh)
        assert all(g.done.finish_reason == "length" for g in gens)
        assert not psutil.pid_exists(victim["pid"]) or psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE
        st = asyncio.run(status(address))
        deaths = [d for d in st["deaths"] if d["instance_id"] == victim["instance_id"]]
        assert deaths and deaths[0]["reason"] == "died", st["deaths"]
        # the mesh replaced the function and still serves correctly
        again = asyncio.run(generate_all(address, PROMPTS[:1], LONG))
        assert again[0][0] == expected[0]


async def _raw(address: str, frames: list[bytes], identity: bytes | None = None, timeout_ms: int = 5000):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_ms):
            return sock.recv_multipart()
        return None
    finally:
        sock.close(linger=0)


def test_bad_input_on_every_socket_gets_a_typed_error_and_the_mesh_keeps_serving(tiny_model, reference, tmp_path):
    with running_mesh(tiny_model, tmp_path, **{"policy.name": "all-remote"}) as mesh:
        client_ep, control_ep = mesh.endpoints["client"], mesh.endpoints["control"]
        assert [t for t, _ in asyncio.run(generate_all(client_ep, PROMPTS[:1]))] == reference[:1]

        # client socket: unknown type, malformed header, wrong field type, a non-client message
        reply = decode(asyncio.run(_raw(client_ep, [bytes([0xEE]), b"\x80"])))
        assert reply.code == UnknownMessageType.code
        reply = decode(asyncio.run(_raw(client_ep, [bytes([0x01]), b"\xc1garbage"])))
        assert reply.code == MalformedFrame.code
        frames = encode(ExpertCall(call_id=1, layer=0, expert_ids=[0], counts=[1], x=torch.zeros(1, 32)))
        reply = decode(asyncio.run(_raw(client_ep, [bytes(f) for f in frames])))
        assert reply.code in (RequestRejected.code, "bad_request")

        # control socket: garbage from an unknown peer is dropped (logged), never answered
        assert asyncio.run(_raw(control_ep, [b"\x20", b"nonsense"], identity=b"intruder", timeout_ms=300)) is None

        # worker socket: malformed frame, wrong dtype, oversized tensor, unknown expert
        st = asyncio.run(status(client_ep))
        worker = next(i for i in st["instances"] if i["state"] == "warm")
        ep = worker["endpoint"]
        layer, expert = worker["experts"][0]
        replies = [
            asyncio.run(_raw(ep, [b"\x40", b"\x81\xa1x\x01"])),
            asyncio.run(_raw(ep, _retyped(layer, expert, torch.zeros(2, 32, dtype=torch.int64)))),
            asyncio.run(_raw(ep, _oversized(layer, expert))),
            asyncio.run(_raw(ep, [bytes(f) for f in encode(ExpertCall(  # all-remote: one expert per function
                call_id=9, layer=layer, expert_ids=[(expert + 1) % 4], counts=[1], x=torch.zeros(1, 32)))])),
        ]
        codes = [decode(raw).code if raw is not None else None for raw in replies]
        assert codes[0] == MalformedFrame.code, codes
        assert codes[1] in ("bad_tensor", "malformed_frame"), codes
        assert codes[2] in ("oversized_message", "bad_tensor"), codes
        assert codes[3] == "unknown_expert", codes
        assert all(isinstance(decode(r), WorkerError | ErrorReply) for r in replies)

        # and the mesh still serves, with the right tokens
        results = asyncio.run(generate_all(client_ep))
        assert [t for t, _ in results] == reference, dump(mesh)


def _retyped(layer: int, expert: int, x: torch.Tensor) -> list[bytes]:
    """An ExpertCall whose tensor header says int64: a dtype the data plane does not accept."""
    import msgpack

    frames = [bytes(f) for f in encode(ExpertCall(call_id=2, layer=layer, expert_ids=[expert], counts=[2],
                                                  x=torch.zeros(2, 32)))]
    header = msgpack.unpackb(frames[1], raw=False)
    header["tensors"][0]["dtype"] = "int64"
    frames[1] = msgpack.packb(header, use_bin_type=True)
    frames[2] = x.numpy().tobytes()
    return frames


def _oversized(layer: int, expert: int) -> list[bytes]:
    """An ExpertCall claiming a tensor far beyond the size limit."""
    import msgpack

    frames = [bytes(f) for f in encode(ExpertCall(call_id=3, layer=layer, expert_ids=[expert], counts=[1],
                                                  x=torch.zeros(1, 32)))]
    header = msgpack.unpackb(frames[1], raw=False)
    header["tensors"][0]["shape"] = [1 << 22, 32]
    header["counts"] = [1 << 22]
    frames[1] = msgpack.packb(header, use_bin_type=True)
    return frames


pytestmark = pytest.mark.slow
