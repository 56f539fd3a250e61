"""OpenAI request bodies -> `Params`, checked: every refusal is a 400 naming the parameter.

    parse_completion(body, model)  /v1/completions       prompt: str | [str] | [int] | [[int]]
    parse_chat(body, model)        /v1/chat/completions  messages through `chat_prompt`

Parameters the mesh cannot honour (n > 1, best_of > 1, echo, logprobs, logit_bias, penalties,
suffix, tools, non-text response formats) are refused unless given at their no-op value, so a
client never gets a silent approximation. Unknown keys are ignored, as OpenAI's API does.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.http.errors import ApiError, bad_request

MAX_STOPS = 4  # as OpenAI's API
COMPLETION_MAX_TOKENS = 16  # without max_tokens: OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 128  # without max_tokens: OpenAI's chat has no fixed default; this mesh takes 128
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Params:
    prompt: str  # the text sent to the mesh ("" when prompt_ids are given)
    prompt_ids: list[int] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    slo_class: str
    ignore_eos: bool


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            (low < value if low_open else low <= value) and value <= high):
        raise bad_request(f"{name} must be a number {'>' if low_open else '>='} {low:g} and <= {high:g}, "
                          f"got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise bad_request(f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}", name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return value


def _refuse_unless(body: dict, name: str, *no_ops) -> None:
    if name in body and body[name] not in (None, *no_ops):
        raise bad_request(f"{name}={body[name]!r} is not supported by this server", name, "unsupported_parameter")


def check_model(body: dict, model: str) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad_request("you must provide a model parameter (see GET /v1/models)", "model", "missing_model")
    if name != model:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{model}` (GET /v1/models)",
                       "invalid_request_error", "model", "model_not_found")


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOPS:
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOPS} strings, got {stop!r}", "stop")
    return tuple(s for s in stop if s)


def _common(body: dict, max_tokens_names: tuple[str, ...], default_max_tokens: int) -> dict:
    if (n := _integer(body, "n", 1, 1)) != 1:
        raise bad_request(f"n={n}: only n=1 is supported (send one request per completion)", "n",
                          "unsupported_parameter")
    for name, no_ops in (("best_of", (1,)), ("echo", (False,)), ("logprobs", (False, 0)), ("top_logprobs", (0,)),
                         ("logit_bias", ({},)), ("presence_penalty", (0, 0.0)), ("frequency_penalty", (0, 0.0)),
                         ("suffix", ("",)), ("tools", ([],)), ("functions", ([],))):
        _refuse_unless(body, name, *no_ops)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, None, 1) if max_tokens is None else max_tokens
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad_request("stream_options needs stream=true and must be an object like {\"include_usage\": true}",
                          "stream_options")
    slo_class = body.get("slo_class", "default")
    if not isinstance(slo_class, str) or not slo_class:
        raise bad_request(f"slo_class must be the name of an SLO class, got {slo_class!r}", "slo_class")
    return {
        "max_tokens": max_tokens or default_max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), "seed": _integer(body, "seed", None),
        "stop": _stops(body), "stream": stream, "include_usage": bool(options and _flag(options, "include_usage")),
        "slo_class": slo_class, "ignore_eos": _flag(body, "ignore_eos"),
    }


def parse_completion(body: dict, model: str) -> Params:
    check_model(body, model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        text, ids = prompt, None
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                     for t in prompt):
        text, ids = "", list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("one prompt per request: send a string or one list of token ids", "prompt",
                          "unsupported_parameter")
    else:
        raise bad_request("prompt must be a non-empty string or a list of token ids", "prompt")
    _refuse_unless(body, "response_format", None)
    return Params(prompt=text, prompt_ids=ids, **_common(body, ("max_tokens",), COMPLETION_MAX_TOKENS))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_prompt(messages: list[dict]) -> str:
    """The chat template: "<role>: <content>\\n" per message, then "assistant:"."""
    return "".join(f"{m['role']}: {_content(m, i)}\n" for i, m in enumerate(messages)) + "assistant:"


def parse_chat(body: dict, model: str) -> Params:
    check_model(body, model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
    format_ = body.get("response_format")
    if format_ is not None and format_ != {"type": "text"}:
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", "response_format",
                          "unsupported_parameter")
    return Params(prompt=chat_prompt(messages), prompt_ids=None,
                  **_common(body, ("max_completion_tokens", "max_tokens"), CHAT_MAX_TOKENS))
