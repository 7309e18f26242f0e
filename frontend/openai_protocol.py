"""OpenAI-compatible requests, read and checked: JSON bodies in, typed requests out, and every
refusal an ``ApiError`` that becomes OpenAI's error JSON with the right HTTP status.

The sampling fields OpenAI and stagemesh share keep stagemesh's names and bounds (``temperature``,
``top_p``, ``seed``; vLLM's extras ``top_k``, ``min_p``, ``stop_token_ids``, ``ignore_eos``), so
``stagemesh.serving.validate`` checks them as it checks a gRPC request; ``logprobs`` (completions:
a count; chat: a flag with ``top_logprobs``) becomes ``SamplingParams.logprobs`` / ``top_logprobs``.
What the mesh cannot do yet (penalties, tools, ...) is refused with a 400 that says so, never
ignored; an unknown field is refused as OpenAI refuses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from frontend.servicer import RETRY_PUSHBACK_MS
from stagemesh.errors import StagemeshError
from stagemesh.serving.params import MAX_TOP_LOGPROBS, SamplingParams, with_values

MAX_N = 128
"""Sequences one request may ask for per prompt. NOTE: each is a request of its own in the
gateway's queue (1,024 per chain by default): a bound well under that keeps one HTTP call from
filling it, and is above what clients ask for (vLLM's benchmarks use n <= 16)."""
COMPLETION_MAX_TOKENS = 16
"""``/v1/completions`` without ``max_tokens`` generates this many at most: OpenAI's documented default.
(Chat's default is the rest of the context, as OpenAI's; the gateway books KV for all of it.)"""
DEFAULT_TEMPERATURE = 1.0
"""Without ``temperature``: OpenAI's documented default (1, sampling), not the gRPC API's 0 (greedy)."""
MAX_STOPS = 16
"""Stop strings per request (OpenAI allows 4). NOTE: each is searched in every piece of new text;
16 of 22 characters cost ~10 µs a token in all (detokenizing included; 2 µs without stop
strings, measured on this project's 2-core dev host), a quarter of what one stream message costs."""

STATUS_OF = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
             "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
"""HTTP status of each mesh status code (``stagemesh.errors``); 401: a missing or wrong API key (``frontend.auth``)."""
TYPE_OF = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
           429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable_error", 504: "timeout_error"}

IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
"""Fields that change nothing a model computes: accepted and left aside."""
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids", "ignore_eos")
"""Fields that go to ``SamplingParams`` under the same names."""
COMMON = frozenset({"model", "max_tokens", "n", "stream", "stream_options", "stop", "logprobs", "frequency_penalty",
                    "presence_penalty", "logit_bias", *SAMPLING}) | IGNORED
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "response_format", "chat_template_kwargs"}


class ApiError(Exception):
    """A refusal: its HTTP status and the fields of OpenAI's ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        """Retry hints: ``Retry-After``, and ``x-should-retry`` (which the openai client honours)."""

    @classmethod
    def from_mesh(cls, err: StagemeshError, *, final: bool = True) -> ApiError:
        """The HTTP form of a mesh status (INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE
        503, ...), with the gRPC API's retry hints: come back in a second when the queue is full;
        do not retry an UNAVAILABLE that is the mesh's verdict (``final``: no chain came back in
        time), unlike one that is this frontend's own trouble (another frontend may serve)."""
        headers = {}
        if err.code == "RESOURCE_EXHAUSTED":
            headers["Retry-After"] = str(math.ceil(RETRY_PUSHBACK_MS / 1000))
        elif err.code == "UNAVAILABLE" and final:
            headers["x-should-retry"] = "false"
        return cls(STATUS_OF.get(err.code, 500), err.message, code=err.code.lower(), headers=headers)

    def body(self) -> dict:
        kind = TYPE_OF.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True, kw_only=True)
class Options:
    """What a completion and a chat request share: how many sequences, how long, how to stream."""

    params: SamplingParams
    """Sampling and stop-token parameters; ``max_new_tokens`` is set per prompt (``max_new_tokens``)."""
    max_tokens: int | None = None
    """Tokens to generate at most per sequence, as the client asked; None: it did not say."""
    default_max_tokens: int | None = None
    """Without ``max_tokens``: this many at most (fewer when the context ends first); None: up to
    the model's context."""
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk with the usage and no choices."""
    stops: tuple[str, ...] = ()
    model: str | None = None


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[str | tuple[int, ...], ...]
    """Each prompt as text or token ids; one choice (``n`` of them) per prompt."""
    options: Options


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    """The conversation as the chat template reads it (text content, None values dropped)."""
    options: Options
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """``chat_template_kwargs``: more variables for the template (e.g. ``enable_thinking``)."""


def parse_completion(body: Any) -> CompletionRequest:
    """A ``/v1/completions`` body; ApiError 400 naming what is wrong."""
    body = _object(body, COMPLETION_FIELDS)
    if body.get("echo"):
        raise bad("echo is not supported: the answer holds only the generated text", "echo")
    if body.get("suffix") is not None:
        raise bad("suffix is not supported: the models served here do not fill in the middle", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported: ask for n sequences and choose among them", "best_of")
    options = _options(body, body.get("max_tokens"), "max_tokens")
    options = _with_logprobs(options, body.get("logprobs") is not None, _top_count(body, "logprobs"))
    return CompletionRequest(_prompts(body.get("prompt")),
                             dataclasses.replace(options, default_max_tokens=COMPLETION_MAX_TOKENS))


def parse_chat(body: Any) -> ChatRequest:
    """A ``/v1/chat/completions`` body; ApiError 400 naming what is wrong."""
    body = _object(body, CHAT_FIELDS)
    wanted, top = _flag(body, "logprobs"), _top_count(body, "top_logprobs")
    if top and not wanted:
        raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise bad("tools are not supported yet: the frontends do not parse tool calls out of the text", "tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("response_format other than {\"type\": \"text\"} is not supported yet", "response_format")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    options = _with_logprobs(_options(body, body.get(name), name), wanted, top)
    return ChatRequest(_messages(body.get("messages")), options, kwargs)


def max_new_tokens(options: Options, prompt_tokens: int, context: int) -> int:
    """Tokens a sequence after a ``prompt_tokens`` prompt may generate; ApiError 400 when the
    prompt and ``max_tokens`` pass the model's context (the prompt alone is checked elsewhere)."""
    room = context - prompt_tokens
    if options.max_tokens is None:
        return max(1, min(room, options.default_max_tokens or room))
    if options.max_tokens > room > 0:
        raise bad(f"this model's context is {context} tokens, but {prompt_tokens + options.max_tokens} were asked "
                  f"for ({prompt_tokens} in the prompt, max_tokens={options.max_tokens} for the completion); "
                  "lower max_tokens or shorten the prompt", "max_tokens", "context_length_exceeded")
    return options.max_tokens


def _object(body: Any, known: frozenset[str]) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"unrecognized request argument {unknown[0]!r}; this endpoint takes: {', '.join(sorted(known))}",
                  unknown[0])
    return body


def _options(body: dict, max_tokens: Any, max_name: str) -> Options:
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported yet; leave it out or set it to 0", name)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported yet", "logit_bias")
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise bad(f"{max_name}={max_tokens!r} must be an integer >= 1", max_name)
    n = 1 if body.get("n") is None else body["n"]
    if not (_is_int(n) and 1 <= n <= MAX_N):
        raise bad(f"n={n!r} must be an integer in [1, {MAX_N}]", "n")
    stream = _flag(body, "stream")
    usage = _include_usage(body.get("stream_options"), stream)
    return Options(params=_sampling(body), max_tokens=max_tokens, n=n, stream=stream, include_usage=usage,
                   stops=_stops(body.get("stop")), model=_model(body))


def _sampling(body: dict) -> SamplingParams:
    values = {"temperature": DEFAULT_TEMPERATURE}
    values.update((name, body[name]) for name in SAMPLING if body.get(name) is not None)
    ids = values.get("stop_token_ids", [])
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise bad(f"stop_token_ids={ids!r} must be a list of integers", "stop_token_ids")
    try:
        return with_values(SamplingParams(), values, "request")
    except StagemeshError as err:
        raise ApiError.from_mesh(err) from None


def _top_count(body: dict, name: str) -> int:
    """``logprobs`` (completions) or ``top_logprobs`` (chat): how many of the most likely tokens
    to return at each position, in [0, MAX_TOP_LOGPROBS]; 0 when left out."""
    value = body.get(name)
    if value is None:
        return 0
    if not (_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS):
        raise bad(f"{name}={value!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]: the mesh returns the "
                  f"log-probabilities of at most {MAX_TOP_LOGPROBS} most likely tokens a position", name)
    return value


def _with_logprobs(options: Options, wanted: bool, top: int) -> Options:
    if not wanted:
        return options
    return dataclasses.replace(options, params=dataclasses.replace(options.params, logprobs=True, top_logprobs=top))


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return _flag(options, "include_usage")


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop={stop!r} must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    return tuple(stops)


def _prompts(prompt: Any) -> tuple[str | tuple[int, ...], ...]:
    """A string, a list of token ids, or a list of strings and lists of token ids."""
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return (tuple(prompt),)
        if all(isinstance(p, str) or _token_ids(p) for p in prompt):
            return tuple(p if isinstance(p, str) else tuple(p) for p in prompt)
    raise bad("prompt must be a string, a list of token ids, or a non-empty list of strings and token-id lists",
              "prompt")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, i: int) -> dict[str, Any]:
    """One message as transformers hands it to a template: None values dropped, text parts joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad(f"messages[{i}] must be an object with a string role", "messages")
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = "\n".join(_text_part(part, i) for part in content)
    elif content is not None and not isinstance(content, str):
        raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return out


def _text_part(part: Any, i: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise bad(f"messages[{i}] has a {kind!r} content part; the models served here take text parts only", "messages")


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    return model


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name}={value!r} must be true or false", name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
