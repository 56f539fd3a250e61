"""The OpenAI-compatible HTTP front end: a separate process that is a client of the mesh.

    python -m mesh.http --config-json JSON --client tcp://127.0.0.1:7555   (mesh-up does this)

    POST /v1/completions        prompt: a string, or token ids ([int] / [[int]]), one prompt
    POST /v1/chat/completions   messages: [{role, content}], through the chat template below
    GET  /v1/models             the one model it serves ([http] model_name)
    GET  /health                200 when the coordinator answers a ping, else 503

Sampling: max_tokens (max_completion_tokens), temperature, top_p, seed, stop (a string or a
list: generation stops when the text contains one, the text is cut before it), n = 1 only,
stream (server-sent events ending with `data: [DONE]`), stream_options.include_usage.
Extensions (ignored by OpenAI clients, as vLLM's are): `slo_class` (an [slo.classes] name),
`ignore_eos` (decode max_tokens tokens whatever the model says).

Every response, and the last chunk of a stream, carries an extra field "moemesh" taken from
the request's record in the coordinator's RequestDone (mesh/meter.py, mesh/request_cost.py):

    "moemesh": {"request_id", "gb_s", "cost_usd", "ttft_s", "tpot_s", "slo_class", "slo_met",
                "cold_starts", "remote_calls", "fallbacks", "policy"}

gb_s / cost_usd are the request's share of what the mesh was billed while it was in flight
(mesh/request_cost.py says how it is shared); cold_starts counts the cold starts on its path.

The chat template (the bundled tokenizer has none): one line per message, then the cue,

    "<role>: <content>\\n" for each message, then "assistant:"

e.g. [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}] ->
"system: Be brief.\\nuser: 2 + 3?\\nassistant:". Content may be a string or a list of
{"type": "text", "text": ...} parts (joined); other part types are refused with 400.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 bad input,
404 unknown model, 429 more than [http] max_concurrent_requests in flight (or the coordinator
says overloaded), 503 the mesh is unreachable, 504 a timeout (mesh/http/errors.py maps the
SDK's typed errors). A client that disconnects cancels its request in the mesh.

Why aiohttp: one well-kept package (aio-libs, since 2014) that is both the server and, for the
bench and the tests, a streaming client; plain `StreamResponse` writes for SSE with no
framework layer between a token and the socket; handler cancellation on disconnect built in;
it runs on the asyncio loop that the SDK already uses, with no ASGI server to configure.
"""
