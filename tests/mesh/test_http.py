"""The OpenAI-compatible front end (mesh/http/) against a real mesh: the official `openai`
client, streaming and not, tokens equal to the SDK's, stop strings, error codes, and a
disconnect that frees the request in the mesh.

One mesh for the module (bundled model, two experts remote so that functions, cold starts
and billing are real), its HTTP front end as its own process (mesh/http/process.py, what
mesh-up runs); the 429 / 503 / 504 cases run the same app in this process.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp import web

from mesh.client import MeshClient
from mesh.http.app import make_app
from mesh.http.errors import ApiError
from mesh.http.params import chat_prompt, parse_chat, parse_completion
from mesh.http.process import FrontEnd
from mesh.http.stops import StopMatcher
from tests.mesh.conftest import running_mesh

MODEL = "moemesh-bundled"
PROMPT = "def fibonacci(n):"
REMOTE = {"policy.name": "static-split", "policy.remote": [[0, 0], [1, 1]], "http.port": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    with running_mesh("bundled", tmp, **REMOTE) as mesh:
        with FrontEnd(mesh.config, mesh.endpoints["client"], tmp / "logs") as front:
            front.start()
            yield mesh, front.url


@pytest.fixture(scope="module")
def api(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def sdk(address: str, prompt: str, **kwargs) -> tuple[list[str], object]:
    """Token texts and RequestDone of one request through the SDK."""
    async def run():
        async with MeshClient(address, timeout_s=60) as client:
            gen = client.generate(prompt, **kwargs)
            return [t.text async for t in gen], gen.done

    return asyncio.run(run())


def status(address: str) -> dict:
    async def run():
        async with MeshClient(address) as client:
            return await client.status()

    return asyncio.run(run())


# -- unit: stop strings ---------------------------------------------------------------------


def test_stop_matcher_cuts_before_a_stop_split_across_pieces():
    m = StopMatcher(["END", "\n\n"])
    out = []
    for piece in ["ab", "cE", "N", "Dzz"]:
        text, hit = m.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "abc" and hit
    m = StopMatcher(["xyz"])
    assert m.push("abx") == ("ab", False)  # "x" held: it may begin "xyz"
    assert m.push("q") == ("xq", False)
    assert m.flush() == ""
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_request_bodies_parse_or_are_refused_naming_the_parameter():
    p = parse_completion({"model": MODEL, "prompt": ["hi"], "stop": "x", "seed": 3, "temperature": 0}, MODEL)
    assert (p.prompt, p.prompt_ids, p.stop, p.seed, p.temperature, p.max_tokens) == ("hi", None, ("x",), 3, 0.0, 16)
    assert parse_completion({"model": MODEL, "prompt": [[5, 6]]}, MODEL).prompt_ids == [5, 6]
    chat = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                       "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}, MODEL)
    assert (chat.prompt, chat.max_tokens, chat.include_usage) == ("user: ab\nassistant:", 5, True)
    for body, param in (({"prompt": "x"}, "model"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "x", "n": 2}, "n"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
                        ({"prompt": "x", "logprobs": 2}, "logprobs"), ({"prompt": "x", "echo": True}, "echo"),
                        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
                        ({"prompt": "x", "seed": 1.5}, "seed"), ({"prompt": "x", "stream": "yes"}, "stream")):
        with pytest.raises(ApiError) as err:
            parse_completion({"model": MODEL, **body} if param != "model" else body, MODEL)
        assert (err.value.status, err.value.param) == (400, param), body
    with pytest.raises(ApiError) as err:
        parse_chat({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, MODEL)
    assert err.value.param == "messages[0].role"
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "other", "prompt": "x"}, MODEL)
    assert (err.value.status, err.value.code) == (404, "model_not_found")


# -- against the mesh -------------------------------------------------------------------------


def test_models_and_health(served, api):
    assert [m.id for m in api.models.list().data] == [MODEL]
    with urllib.request.urlopen(served[1] + "/health") as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.9, 1234)])
def test_completion_tokens_equal_the_sdk_streaming_and_not(served, api, temperature, seed):
    mesh, _ = served
    texts, done = sdk(mesh.endpoints["client"], PROMPT, max_new_tokens=12, temperature=temperature, seed=seed,
                      stop_at_eos=False)
    expected = "".join(texts)
    extra = {"ignore_eos": True}
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=temperature, seed=seed,
                                   extra_body=extra)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (done.prompt_tokens, 12)
    extra_fields = whole.model_extra["moemesh"]
    assert extra_fields["slo_class"] == "interactive" and extra_fields["gb_s"] > 0 and extra_fields["cost_usd"] > 0
    assert extra_fields["ttft_s"] > 0 and extra_fields["tpot_s"] > 0 and isinstance(extra_fields["slo_met"], bool)
    assert extra_fields["policy"] == "static-split" and extra_fields["cold_starts"] >= 0

    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=temperature,
                                         seed=seed, stream=True, stream_options={"include_usage": True},
                                         extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].model_extra["moemesh"]["request_id"] == chunks[0].id.removeprefix("cmpl-")


def test_chat_streams_through_the_template(served, api):
    mesh, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert chat_prompt(messages) == "system: Be brief.\nuser: What is 2 + 3?\nassistant:"
    texts, _ = sdk(mesh.endpoints["client"], chat_prompt(messages), max_new_tokens=10, stop_at_eos=False)
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(texts)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["moemesh"]["gb_s"] > 0  # no include_usage: the finishing chunk carries it
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == "".join(texts) and whole.choices[0].message.role == "assistant"


def test_stop_strings_cut_the_text_and_end_the_request(served, api):
    mesh, _ = served
    texts, _ = sdk(mesh.endpoints["client"], PROMPT, max_new_tokens=24, stop_at_eos=False)
    full = "".join(texts)
    stop = full[6:9]
    assert stop and full.find(stop) >= 0
    expected = full[: full.find(stop)]
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                   stop=[stop, "never-there"], extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24
    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    rid = chunks[-1].model_extra["moemesh"]["request_id"]
    record = next(r for r in status(mesh.endpoints["client"])["records"] if r["request_id"] == rid)
    assert record["finish_reason"] == "cancelled" and record["generated_tokens"] < 24  # freed in the mesh


def test_errors_are_openai_shaped_with_the_right_status(served, api):
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=4)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:  # refused by the coordinator: RequestRejected -> 400
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True,
                               extra_body={"slo_class": "gold"})
    assert err.value.body["code"] == "unknown_slo_class" and "interactive" in err.value.body["message"]
    request = urllib.request.Request(served[1] + "/v1/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request)
    assert http_err.value.code == 400
    assert set(json.load(http_err.value)["error"]) == {"message", "type", "param", "code"}


def _record_of(address: str, rid: str) -> dict | None:
    return next((r for r in status(address)["records"] if r["request_id"] == rid), None)


async def test_a_disconnect_mid_stream_cancels_the_request_in_the_mesh(served):
    mesh, url = served
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(url + "/v1/completions", json=body)
        assert response.status == 200
        seen = 0
        rid = None
        async for line in response.content:
            if line.startswith(b"data: {"):
                rid = rid or json.loads(line[6:])["id"].removeprefix("cmpl-")
                seen += 1
                if seen == 3:
                    break
        response.close()  # drop the connection mid-stream
    record = await asyncio.to_thread(_poll, lambda: _record_of(mesh.endpoints["client"], rid),
                                     "the request to end after its client went away")
    assert record["finish_reason"] == "cancelled"
    assert 3 <= record["generated_tokens"] < 100000


async def test_a_disconnect_before_a_whole_answer_cancels_it_too(served):
    mesh, url = served
    address = mesh.endpoints["client"]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    before = {r["request_id"] for r in (await asyncio.to_thread(status, address))["records"]}
    payload = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100000, "ignore_eos": True}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    await asyncio.to_thread(_poll, lambda: status(address)["slo"]["requests_active"] > 0, "the request to start")
    writer.close()  # the client goes away before any byte of the answer

    def finished() -> dict | None:
        snap = status(address)
        new = [r for r in snap["records"] if r["request_id"] not in before]
        return new[0] if new and not snap["slo"]["requests_active"] else None

    record = await asyncio.to_thread(_poll, finished, "the request to end after its client went away")
    assert record["finish_reason"] == "cancelled"


def _poll(check, what: str, timeout_s: float = 30.0):
    """Ask the coordinator until `check()` is truthy (an outcome, with a generous deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)  # between two status calls, not a synchronisation
    raise AssertionError(f"timed out waiting for {what}")


# -- the same app in this process: 429, 503, 504 ----------------------------------------------


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def test_an_unreachable_mesh_is_503():
    runner, url = await _serve(make_app("tcp://127.0.0.1:9", MODEL))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as r:
                assert r.status == 503 and (await r.json())["error"]["type"] == "service_unavailable"
            async with session.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
                assert r.status == 503 and "mesh-up" in (await r.json())["error"]["message"]
    finally:
        await runner.cleanup()


async def test_timeouts_are_504_and_saturation_is_429(served):
    mesh, _ = served
    runner, url = await _serve(make_app(mesh.endpoints["client"], MODEL, timeout_s=0.001))
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
            async with session.post(url + "/v1/completions", json=body) as r:  # no token within 1 ms
                assert r.status == 504 and (await r.json())["error"]["code"] == "timeout"
    finally:
        await runner.cleanup()
    runner, url = await _serve(make_app(mesh.endpoints["client"], MODEL, max_concurrent=1))
    try:
        async with aiohttp.ClientSession() as session:
            long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000, "stream": True, "ignore_eos": True}
            first = await session.post(url + "/v1/completions", json=long)
            assert first.status == 200
            await first.content.readline()  # it is streaming: one request in flight
            async with session.post(url + "/v1/completions", json={**long, "stream": False}) as r:
                assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
            first.close()
    finally:
        await runner.cleanup()
