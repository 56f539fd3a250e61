"""The client SDK's exactly-one-outcome contract, against a scripted coordinator on a real
loopback socket: duplicates dropped by request id and token index, one final result or one
typed error, nothing after cancel(), open streams failed (not hung) when the client closes."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from mesh.client import MeshClient
from mesh.errors import Cancelled, MeshUnavailable, RequestRejected
from mesh.protocol import (
    CancelRequest,
    ErrorReply,
    GenerateRequest,
    Ping,
    Pong,
    RequestDone,
    TokenEvent,
    decode,
    encode,
)

DEADLINE_S = 30.0  # generous: only reached when something is broken


class FakeCoordinator:
    """A ROUTER that answers Ping and hands every other message to the test."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            msg = decode(frames)
            if isinstance(msg, Ping):
                await self.sock.send_multipart([identity, *encode(Pong(seq=msg.seq))])
            else:
                await self.inbox.put((identity, msg))

    async def next(self, kind: type):
        identity, msg = await asyncio.wait_for(self.inbox.get(), DEADLINE_S)
        assert isinstance(msg, kind), msg
        return identity, msg

    async def send(self, identity: bytes, *msgs) -> None:
        for msg in msgs:
            await self.sock.send_multipart([identity, *encode(msg)])

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(linger=0)


def done(request_id: str, n: int) -> RequestDone:
    return RequestDone(request_id, "length", 2, n, 0.01, 0.01, {})


def token(request_id: str, index: int) -> TokenEvent:
    return TokenEvent(request_id, index, 10 + index, f"t{index}")


async def with_client(body) -> None:
    context = zmq.asyncio.Context()
    fake = FakeCoordinator(context)
    try:
        async with MeshClient(fake.address, context=context, timeout_s=DEADLINE_S) as client:
            await body(fake, client)
    finally:
        await fake.close()
        context.term()


def test_duplicates_are_dropped_and_one_outcome_ends_the_stream() -> None:
    async def body(fake: FakeCoordinator, client: MeshClient) -> None:
        gen = client.generate("", prompt_ids=[1, 2], max_new_tokens=4, request_id="r1")
        stream = gen.__aiter__()
        first = asyncio.ensure_future(stream.__anext__())
        identity, request = await fake.next(GenerateRequest)
        await fake.send(identity, token("r1", 0), token("r1", 0), token("other", 0), token("r1", 1),
                        token("r1", 0), token("r1", 2), done("r1", 3), done("r1", 3),
                        ErrorReply("r1", "internal", "late", ""), token("r1", 3))
        got = [(await first).index]
        got += [t.index async for t in stream]
        assert got == [0, 1, 2]
        assert gen.done is not None and gen.done.generated_tokens == 3

    asyncio.run(with_client(body))


def test_an_error_is_the_only_outcome() -> None:
    async def body(fake: FakeCoordinator, client: MeshClient) -> None:
        gen = client.generate("", prompt_ids=[1], max_new_tokens=4, request_id="r2")
        got = []

        async def consume() -> None:
            async for t in gen:
                got.append(t.index)

        task = asyncio.ensure_future(consume())
        identity, _ = await fake.next(GenerateRequest)
        await fake.send(identity, token("r2", 0),
                        ErrorReply("r2", "overloaded", "too busy", "retry later"),
                        done("r2", 1), ErrorReply("r2", "internal", "second", ""))
        with pytest.raises(RequestRejected, match="too busy"):
            await asyncio.wait_for(task, DEADLINE_S)
        assert got == [0] and gen.done is None

    asyncio.run(with_client(body))


def test_no_token_after_cancel_even_when_many_are_queued() -> None:
    async def body(fake: FakeCoordinator, client: MeshClient) -> None:
        gen = client.generate("", prompt_ids=[1], max_new_tokens=100, request_id="r3")
        stream = gen.__aiter__()
        first = asyncio.ensure_future(stream.__anext__())
        identity, _ = await fake.next(GenerateRequest)
        await fake.send(identity, *(token("r3", i) for i in range(20)))
        assert (await asyncio.wait_for(first, DEADLINE_S)).index == 0
        async with asyncio.timeout(DEADLINE_S):  # wait for the outcome: all 19 queued
            while gen.queue.qsize() < 19:
                await asyncio.sleep(0.005)
        await gen.cancel()
        await fake.send(identity, token("r3", 20), done("r3", 21))  # late: dropped
        with pytest.raises(Cancelled):
            await stream.__anext__()
        _, cancel = await fake.next(CancelRequest)
        assert cancel.request_id == "r3"
        assert [t.index for t in gen.tokens] == [0]

    asyncio.run(with_client(body))


def test_cancel_from_another_task_wakes_a_waiting_stream() -> None:
    async def body(fake: FakeCoordinator, client: MeshClient) -> None:
        gen = client.generate("", prompt_ids=[1], max_new_tokens=100, request_id="r4")
        stream = gen.__aiter__()
        waiting = asyncio.ensure_future(stream.__anext__())
        await fake.next(GenerateRequest)
        await gen.cancel()
        with pytest.raises(Cancelled):
            await asyncio.wait_for(waiting, DEADLINE_S)
        await fake.next(CancelRequest)

    asyncio.run(with_client(body))


def test_closing_the_client_fails_open_streams() -> None:
    async def run() -> None:
        context = zmq.asyncio.Context()
        fake = FakeCoordinator(context)
        client = MeshClient(fake.address, context=context, timeout_s=DEADLINE_S)
        await client.connect()
        gen = client.generate("", prompt_ids=[1], max_new_tokens=100, request_id="r5")
        stream = gen.__aiter__()
        waiting = asyncio.ensure_future(stream.__anext__())
        await fake.next(GenerateRequest)
        await client.close()
        with pytest.raises(MeshUnavailable, match="closed"):
            await asyncio.wait_for(waiting, DEADLINE_S)
        await fake.close()
        context.term()

    asyncio.run(run())
