"""The Python client SDK: async, streaming, typed errors.

    async with MeshClient("tcp://127.0.0.1:5555") as client:
        gen = client.generate("Question: 2 + 3 = ?", max_new_tokens=32, slo_class="interactive")
        async for token in gen:              # TokenEvent(request_id, index, token_id, text)
            print(token.text, end="")
        print(gen.done.ttft_s, gen.done.record["slo"]["met"])

One reader task per connection feeds a queue per request (exceptions too); pings and status
calls are futures keyed by sequence number (vLLM's AsyncMPClient pattern). Leaving the loop early
or cancelling the task cancels the request on the mesh. `SyncMeshClient` is a thin blocking
wrapper for scripts.

Exactly one outcome per request: a stream yields each token index once, in order (a duplicate
or stale TokenEvent is dropped), then ends with one RequestDone or raises one typed error;
anything the coordinator sends for that request afterwards is dropped. `cancel()` ends the
stream at once: the tokens already received but not yet taken are discarded, and the next step
of the iteration raises Cancelled. A reader that loses its socket fails every open stream with
MeshUnavailable rather than leaving it to time out.

CURVE: `MeshClient(address, keys_dir="keys")` dials with the pair `keys/client.secret` and
expects the server key `keys/coordinator.public` (`key=` / `server_key=` name other pairs);
see mesh/security.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import zmq
import zmq.asyncio

from mesh.config import MeshConfig, SecurityConfig
from mesh.errors import (
    Cancelled,
    MeshError,
    MeshUnavailable,
    ProtocolError,
    Timeout,
    error_from_reply,
)
from mesh.protocol import (
    CancelRequest,
    ErrorReply,
    GenerateRequest,
    Ping,
    Pong,
    RequestDone,
    StatusReply,
    StatusRequest,
    TokenEvent,
    decode,
    encode,
)
from mesh.security import Setup, is_loopback
from mesh.sockets import harden

log = logging.getLogger("moemesh.client")


class Generation:
    """One request's token stream. Iterate it; afterwards `.done` holds the RequestDone.

    tokens: the TokenEvents yielded so far (index 0, 1, 2, ... with no repeats).
    """

    def __init__(self, client: MeshClient, request: GenerateRequest, timeout_s: float) -> None:
        self.client, self.request, self.timeout_s = client, request, timeout_s
        self.request_id = request.request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done: RequestDone | None = None
        self.tokens: list[TokenEvent] = []
        self._started = False
        self._final = False  # an outcome (RequestDone or an error) is decided: nothing more counts
        self._next_index = 0  # the token index expected next; lower ones are duplicates

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._stream()

    def _deliver(self, item: TokenEvent | RequestDone | BaseException) -> bool:
        """Queue what the reader received for this request, or drop it (duplicate, stale, or
        after the outcome). Returns whether it was the request's outcome."""
        if self._final:
            return False
        if isinstance(item, TokenEvent):
            if item.index < self._next_index:
                log.debug("request %s: dropped duplicate token %d", self.request_id, item.index)
                return False
            self._next_index = item.index + 1
            self.queue.put_nowait(item)
            return False
        self._final = True
        self.queue.put_nowait(item)
        return True

    def _end(self, outcome: BaseException | None = None) -> None:
        """Decide the outcome now (`outcome`, or the one already received): tokens received but
        not yet taken are discarded."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        received = [i for i in items if not isinstance(i, TokenEvent)]
        if outcome is None and received:
            outcome = received[0]
        self._final = True
        if outcome is not None:
            self.queue.put_nowait(outcome)

    async def _stream(self) -> AsyncIterator[TokenEvent]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        if not self._final:  # (cancelled before it started: nothing to send)
            await self.client._start(self)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), self.timeout_s)
                except TimeoutError:
                    raise Timeout(f"request {self.request_id}: no token for {self.timeout_s:.1f} s",
                                  hint="raise timeout_s, or check the mesh with `moemesh status`") from None
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, RequestDone):
                    self.done = item
                    return
                self.tokens.append(item)
                yield item
        finally:
            if not self._final:  # left early (break, task cancelled, timeout): cancel on the mesh
                self._final = True
                await self.client._cancel(self.request_id)
            self.client._streams.pop(self.request_id, None)

    async def text(self) -> str:
        """Run to the end and return the generated text."""
        return "".join([t.text async for t in self])

    async def cancel(self) -> None:
        """End the stream now: no token is yielded after this returns. The iteration raises
        Cancelled, or ends with `.done` if the request had finished already."""
        if self._final:
            self._end()  # the outcome is in: only it remains
            return
        self._end(Cancelled(f"request {self.request_id} cancelled"))
        await self.client._cancel(self.request_id)


class MeshClient:
    def __init__(self, address: str, *, timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 context: zmq.asyncio.Context | None = None, keys_dir: str | Path | None = None,
                 key: str = "client", server_key: str = "coordinator") -> None:
        self.address = address
        # keys_dir: CURVE with the pair `key` against the server key `server_key` (both files
        # of `moemesh keys`); None: plain, as a loopback mesh serves by default.
        self.security = Setup(SecurityConfig(
            curve="on" if keys_dir is not None else "off",
            keys_dir=None if keys_dir is None else str(keys_dir),
            coordinator_key=server_key, client_keys=(key,), allow_insecure_off_loopback=True,
        ), own_key=key)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.context = context or zmq.asyncio.Context.instance()
        self.socket: zmq.asyncio.Socket | None = None
        self._streams: dict[str, Generation] = {}
        self._pings: dict[int, asyncio.Future] = {}
        self._status: list[asyncio.Future] = []
        self._seq = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self._checked = False

    @classmethod
    def from_config(cls, address: str, config: MeshConfig, **kwargs) -> MeshClient:
        """A client as launch.toml's [security] says: CURVE with its first `client_keys` pair
        when curve is "on", or "auto" with keys and an address off loopback; else plain."""
        s = config.security
        if s.client_keys and s.keys_dir and (
                s.curve == "on" or (s.curve == "auto" and not is_loopback(address))):
            kwargs = {"keys_dir": s.keys_dir, "key": s.client_keys[0],
                      "server_key": s.coordinator_key, **kwargs}
        return cls(address, **kwargs)

    async def __aenter__(self) -> MeshClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        if self.socket is not None:
            return
        self.socket = self.context.socket(zmq.DEALER)
        harden(self.socket, "client", self.security, connect=self.address)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IDENTITY, f"client-{uuid.uuid4().hex[:12]}".encode())
        self.socket.connect(self.address)
        self._reader = asyncio.create_task(self._read(), name="moemesh-client-reader")
        try:
            await self.ping(self.connect_timeout_s)
        except BaseException:
            await self.close()
            raise
        self._checked = True

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        self._fail_all(MeshUnavailable("client closed while the request was streaming",
                                       hint="keep the MeshClient open until its streams end"))

    async def ping(self, timeout_s: float | None = None) -> float:
        """Round trip to the coordinator in seconds; MeshUnavailable if it does not answer."""
        seq = next(self._seq)
        future = asyncio.get_running_loop().create_future()
        self._pings[seq] = future
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._send(Ping(seq=seq))
        try:
            await asyncio.wait_for(future, timeout_s or self.connect_timeout_s)
        except TimeoutError:
            raise MeshUnavailable(
                f"no coordinator answered at {self.address} within {timeout_s or self.connect_timeout_s:.1f} s",
                hint="start the mesh with `mesh-up` (or `make up`), or pass the right --address"
                + ("; with CURVE, check that the coordinator allows this client's key and that "
                   "server_key names its public key" if self.security.settings.curve == "on" else ""),
            ) from None
        finally:
            self._pings.pop(seq, None)
        return loop.time() - start

    async def status(self, timeout_s: float = 5.0) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._status.append(future)
        await self._send(StatusRequest())
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise MeshUnavailable(f"no status from {self.address} within {timeout_s:.1f} s",
                                  hint="is the mesh up? `mesh-up` prints its client address") from None
        return reply.status

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, slo_class: str = "default", request_id: str | None = None,
                 prompt_ids: list[int] | None = None, stop_at_eos: bool = True,
                 timeout_s: float | None = None) -> Generation:
        request = GenerateRequest(
            request_id=request_id or uuid.uuid4().hex, prompt=prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, slo_class=slo_class, stop_at_eos=stop_at_eos,
            prompt_ids=prompt_ids,
        )
        return Generation(self, request, timeout_s or self.timeout_s)

    # -- internals -------------------------------------------------------------------------------

    async def _start(self, gen: Generation) -> None:
        if self.socket is None:
            await self.connect()
        if gen.request_id in self._streams:
            raise MeshError(f"request id {gen.request_id} is already streaming", hint="use a fresh request_id")
        self._streams[gen.request_id] = gen
        await self._send(gen.request)

    async def _cancel(self, request_id: str) -> None:
        """Tell the coordinator to stop `request_id`; what it still sends for it is dropped."""
        if self._streams.pop(request_id, None) is None or self.socket is None:
            return
        try:
            await self._send(CancelRequest(request_id=request_id))
        except zmq.ZMQError:
            pass

    def _fail_all(self, error: MeshError) -> None:
        for gen in list(self._streams.values()):
            gen._end(type(error)(error.message, hint=error.hint))
        self._streams.clear()

    async def _send(self, msg) -> None:
        if self.socket is None:
            raise MeshUnavailable("client is closed", hint="use `async with MeshClient(...)`")
        await self.socket.send_multipart(encode(msg), copy=False)

    async def _read(self) -> None:
        try:
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                self._dispatch(frames)
        except zmq.ZMQError as exc:  # the socket went away under the reader
            self._fail_all(MeshUnavailable(f"lost the connection to {self.address} ({exc})"))

    def _dispatch(self, frames) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the coordinator: %s", exc)
            return
        if isinstance(msg, TokenEvent | RequestDone | ErrorReply) and msg.request_id:
            gen = self._streams.get(msg.request_id)
            if gen is None:
                if isinstance(msg, ErrorReply):
                    log.warning("coordinator error for request %s: %s", msg.request_id,
                                error_from_reply(msg))
                return  # an ended request: whatever comes late is dropped
            item = error_from_reply(msg) if isinstance(msg, ErrorReply) else msg
            if gen._deliver(item):
                self._streams.pop(msg.request_id, None)  # its one outcome is in
        elif isinstance(msg, ErrorReply):
            log.warning("coordinator error: %s", error_from_reply(msg))
        elif isinstance(msg, Pong):
            future = self._pings.get(msg.seq)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, StatusReply):
            while self._status:
                future = self._status.pop(0)
                if not future.done():
                    future.set_result(msg)
                    break


class SyncMeshClient:
    """Blocking wrapper: its own event loop on a background thread."""

    def __init__(self, address: str, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="moemesh-sync-client", daemon=True)
        self._thread.start()
        self._client = MeshClient(address, context=None, **kwargs)
        self._call(self._make())

    async def _make(self) -> None:
        self._client.context = zmq.asyncio.Context()
        await self._client.connect()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str, **kwargs) -> Iterator[TokenEvent]:
        out: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for token in self._client.generate(prompt, **kwargs):
                    out.put(token)
                out.put(None)
            except BaseException as exc:  # handed to the caller's thread
                out.put(exc)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def status(self) -> dict:
        return self._call(self._client.status())

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
