"""The aiohttp application: OpenAI routes over one `MeshClient` (mesh/http/__init__.py says
what is served and how).

    app = make_app(client_address, model_name="moemesh-bundled", max_concurrent=64, timeout_s=125)

One request = one `Generation` of the SDK. Its tokens become SSE chunks as they arrive (the
response headers wait for the first token, so an error before it is a plain JSON error with
its status). A stop string found in the text sends the mesh a CancelRequest and keeps reading
until the coordinator's RequestDone, whose record gives the "moemesh" field. A client that
disconnects cancels the handler (aiohttp `handler_cancellation`), which closes the Generation:
the SDK then cancels the request in the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from mesh.client import MeshClient
from mesh.errors import MeshError, MeshUnavailable
from mesh.http.errors import ApiError, bad_request, from_mesh_error
from mesh.http.params import Params, parse_chat, parse_completion
from mesh.http.stops import StopMatcher
from mesh.protocol import CancelRequest, RequestDone

log = logging.getLogger("moemesh.http")

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine reasons -> OpenAI's
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
LIVENESS = 3  # failed pings in a row before the mesh counts as down (503 without trying)


class MeshLink:
    """The SDK client and whether the coordinator answers pings (Paranoid Pirate style)."""

    def __init__(self, address: str, timeout_s: float, config=None) -> None:
        """config: a MeshConfig whose [security] keys the link dials with (CURVE where it says
        so, as MeshClient.from_config); None: plain."""
        self.address = address
        kwargs = {"timeout_s": timeout_s, "connect_timeout_s": PING_TIMEOUT_S}
        self.client = (MeshClient.from_config(address, config, **kwargs) if config is not None
                       else MeshClient(address, **kwargs))
        self.failures = 0
        self.task: asyncio.Task | None = None

    @property
    def up(self) -> bool:
        return self.failures < LIVENESS

    async def open(self) -> None:
        try:
            await self.client.connect()
        except MeshUnavailable:
            self.failures = LIVENESS  # never answered: down until a ping comes back
        self.task = asyncio.create_task(self._watch(), name="moemesh-http-ping")

    async def ping(self) -> float:
        try:
            seconds = await self.client.ping(PING_TIMEOUT_S)
        except MeshUnavailable:
            self.failures += 1
            raise
        self.failures = 0
        return seconds

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)  # the heartbeat interval, not a synchronisation
            with contextlib.suppress(MeshUnavailable):
                await self.ping()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


@dataclass
class Piece:
    text: str


@dataclass
class Final:
    finish_reason: str
    completion_tokens: int
    done: RequestDone | None


def mesh_fields(done: RequestDone | None) -> dict:
    """The "moemesh" field: what only this mesh knows about the request (its record)."""
    record = (done.record if done is not None else None) or {}
    return {
        "request_id": record.get("request_id"), "gb_s": record.get("gb_s"), "cost_usd": record.get("cost_usd"),
        "ttft_s": record.get("ttft_s"), "tpot_s": record.get("tpot_s"), "slo_class": record.get("slo_class"),
        "slo_met": (record.get("slo") or {}).get("met"),
        "cold_starts": len(record.get("cold_starts_on_path") or []),
        "remote_calls": record.get("remote_calls"), "fallbacks": record.get("fallbacks"),
        "policy": record.get("policy"),
    }


class Server:
    def __init__(self, link: MeshLink, model: str, max_concurrent: int) -> None:
        self.link, self.model, self.max_concurrent = link, model, max_concurrent
        self.in_flight = 0
        self.created = int(time.time())

    # -- the mesh side -------------------------------------------------------------------------

    async def generate(self, p: Params, request_id: str) -> AsyncIterator[Piece | Final]:
        """Pieces of text (stop strings cut out), then one Final."""
        client = self.link.client
        gen = client.generate(p.prompt, prompt_ids=p.prompt_ids, max_new_tokens=p.max_tokens,
                              temperature=p.temperature, top_p=p.top_p, seed=p.seed, slo_class=p.slo_class,
                              stop_at_eos=not p.ignore_eos, request_id=request_id)
        stream = gen.__aiter__()
        matcher = StopMatcher(p.stop)
        tokens, stopped = 0, False
        try:
            async for token in stream:
                if stopped:
                    continue  # arrived after our CancelRequest: not part of the answer
                tokens += 1
                text, stopped = matcher.push(token.text)
                if text:
                    yield Piece(text)
                if stopped:  # keep the stream open for RequestDone and its record
                    await client._send(CancelRequest(request_id=request_id))
        finally:
            await stream.aclose()  # leaving early: the SDK cancels the request in the mesh
        if not stopped and (rest := matcher.flush()):
            yield Piece(rest)
        done = gen.done
        reason = "stop" if stopped else FINISH.get(done.finish_reason if done else "", "stop")
        yield Final(reason, tokens, done)

    def admit(self) -> None:
        if not self.link.up:
            raise from_mesh_error(MeshUnavailable(
                f"the coordinator at {self.link.address} does not answer pings",
                hint="is the mesh up? `mesh-up` starts it; GET /health says when it is back"))
        if self.in_flight >= self.max_concurrent:
            raise ApiError(429, f"{self.in_flight} requests in flight, the most this server takes "
                           "([http] max_concurrent_requests); retry later", "rate_limit_error", None,
                           "too_many_requests")

    # -- routes --------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": self.created, "owned_by": "moemesh"}]})

    async def health(self, request: web.Request) -> web.Response:
        try:
            seconds = await self.link.ping()
        except MeshUnavailable as exc:
            return _error_response(from_mesh_error(exc))
        return web.json_response({"status": "ok", "mesh": self.link.address, "ping_ms": seconds * 1e3})

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise bad_request("the body must be a JSON object", None, "invalid_json") from None
            if not isinstance(body, dict):
                raise bad_request("the body must be a JSON object", None, "invalid_json")
            params = (parse_chat if chat else parse_completion)(body, self.model)
            self.admit()
        except ApiError as err:
            return _error_response(err)
        request_id = uuid.uuid4().hex
        self.in_flight += 1
        try:
            shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, self.model, int(time.time()))
            events = self.generate(params, request_id)
            async with contextlib.aclosing(events):
                if params.stream:
                    return await self._stream(request, events, shape, params)
                return await self._whole(events, shape)
        finally:
            self.in_flight -= 1

    async def _whole(self, events: AsyncIterator[Piece | Final], shape: Shape) -> web.Response:
        parts: list[str] = []
        try:
            async for event in events:
                if isinstance(event, Piece):
                    parts.append(event.text)
                else:
                    return web.json_response(shape.whole("".join(parts), event))
        except MeshError as exc:
            return _error_response(from_mesh_error(exc))
        raise AssertionError("a generation ends with Final")

    async def _stream(self, request: web.Request, events: AsyncIterator[Piece | Final], shape: Shape,
                      params: Params) -> web.StreamResponse:
        response: web.StreamResponse | None = None

        async def send(payload: dict) -> None:
            nonlocal response
            if response is None:  # headers go with the first event: earlier errors keep their status
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                if shape.chat:
                    await response.write(_sse(shape.chunk({"role": "assistant", "content": ""}, None,
                                                          params.include_usage)))
            await response.write(_sse(payload))

        try:
            async for event in events:
                if isinstance(event, Piece):
                    await send(shape.chunk(event.text, None, params.include_usage))
                    continue
                last = shape.chunk("", event.finish_reason, params.include_usage)
                if params.include_usage:
                    await send(last)
                    last = {**shape.chunk(None, None, True), "choices": [], "usage": shape.usage(event)}
                await send({**last, "moemesh": mesh_fields(event.done)})
        except MeshError as exc:
            err = from_mesh_error(exc)
            if response is None:
                return _error_response(err)
            await response.write(_sse(err.body()))
        except ConnectionResetError:  # the client went away; closing `events` cancels in the mesh
            log.info("client disconnected from %s", shape.id)
            raise
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects for one request (completion or chat)."""

    chat: bool
    id: str
    model: str
    created: int

    def usage(self, final: Final) -> dict:
        prompt = final.done.prompt_tokens if final.done is not None else 0
        return {"prompt_tokens": prompt, "completion_tokens": final.completion_tokens,
                "total_tokens": prompt + final.completion_tokens}

    def whole(self, text: str, final: Final) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(final),
                "moemesh": mesh_fields(final.done)}

    def chunk(self, content: str | dict | None, finish_reason: str | None, with_usage: bool) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if not content else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def make_app(client_address: str, model_name: str, max_concurrent: int = 64, timeout_s: float = 125.0,
             config=None) -> web.Application:
    """The application; its MeshClient connects on start-up (a mesh that is down gives 503s),
    with `config`'s [security] keys when given (a CURVE mesh)."""
    app = web.Application()
    link = MeshLink(client_address, timeout_s, config)
    server = Server(link, model_name, max_concurrent)

    async def lifecycle(app: web.Application):
        await link.open()
        yield
        await link.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/health", server.health)
    return app
