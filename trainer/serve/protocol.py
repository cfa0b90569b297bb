"""The OpenAI wire protocol of the built-in server: request validation and response bodies.

Requests arrive as decoded JSON (`object`); `parse_completion_request` and
`parse_chat_request` turn them into typed dataclasses or raise one `ApiError`
that names the offending parameter, says what is wrong and what is allowed::

    400 {"error": {"message": "max_tokens: must be an integer from 1 to 512, got 4096",
                   "type": "invalid_request_error", "param": "max_tokens",
                   "code": "invalid_value"}}

Unknown parameters are rejected (as OpenAI does), and OpenAI parameters the
server does not implement are accepted only with their neutral value (`n: 1`,
`presence_penalty: 0`, ...), so a client never silently gets something other
than what it asked for.

The response builders produce the exact shapes the official `openai` client
parses: `text_completion`, `chat.completion` and their streaming chunks.
This module imports nothing heavy (no torch), so it is cheap to test.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

FinishReason = Literal["stop", "length"]

MAX_STOP_SEQUENCES = 4
"""OpenAI allows up to four stop sequences."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for the legacy completions endpoint."""
CHAT_ROLES = ("system", "developer", "user", "assistant")
"""Message roles the chat endpoint accepts (`developer` is rendered as `system`)."""


class ApiError(Exception):
    """A request the server refuses, with the OpenAI-style error body it answers with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        """HTTP status code of the answer (4xx for client errors, 5xx for ours)."""
        self.message = message
        """Human-readable explanation: what is wrong and what is allowed."""
        self.param = param
        """The request parameter at fault (dotted/indexed path), if any."""
        self.code = code
        """Machine-readable error code, e.g. `model_not_found`."""
        self.error_type = error_type
        """OpenAI's error `type`: `invalid_request_error` for client errors."""

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.message, param=self.param, code=self.code, error_type=self.error_type)


def error_body(
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming `param`; `message` says what is wrong and what is allowed."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# --- Typed requests ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate: the OpenAI sampling parameters the server implements."""

    max_tokens: int | None
    """Most tokens to generate; None = the endpoint's default (resolved by the server)."""
    temperature: float = 1.0
    """0 = greedy decoding; higher = more random. OpenAI's range is 0 to 2."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    seed: int | None = None
    """Seed for sampling, for reproducible outputs; None = not reproducible."""


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated `POST /v1/completions` body."""

    model: str
    """The served model name the client asked for."""
    prompt: str | tuple[int, ...]
    """Text to continue, or the prompt as token ids."""
    sampling: SamplingParams
    """Generation settings."""
    stream: bool = False
    """Answer with server-sent events, one chunk per piece of text."""
    include_usage: bool = False
    """When streaming, send a last chunk carrying `usage` (`stream_options.include_usage`)."""
    echo: bool = False
    """Prepend the prompt text to the completion."""


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, content flattened to text."""

    role: str
    """`system`, `user` or `assistant` (`developer` arrives as `system`)."""
    content: str
    """The message text (text parts of a multi-part content joined)."""


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated `POST /v1/chat/completions` body."""

    model: str
    """The served model name the client asked for."""
    messages: tuple[ChatMessage, ...]
    """The conversation so far, rendered with the model's chat template."""
    sampling: SamplingParams
    """Generation settings."""
    stream: bool = False
    """Answer with server-sent events (`chat.completion.chunk`)."""
    include_usage: bool = False
    """When streaming, send a last chunk carrying `usage`."""


# --- Field readers ----------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _describe(value: object) -> str:
    """A short rendering of a bad value for error messages."""
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


def _require_object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(body).__name__}", code="invalid_body")
    return body


def _reject_unknown(body: Mapping[str, Any], known: Sequence[str]) -> None:
    for key in body:
        if key not in known:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {key}. Supported: {', '.join(sorted(known))}",
                param=key,
                code="unknown_parameter",
            )


def _model(body: Mapping[str, Any]) -> str:
    if "model" not in body:
        raise invalid("model", "is required (the served model name, see GET /v1/models)", "missing_required_parameter")
    value = body["model"]
    if not isinstance(value, str) or not value:
        raise invalid("model", f"must be a non-empty string, got {_describe(value)}", "invalid_type")
    return value


def _optional_bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be a boolean, got {_describe(value)}", "invalid_type")
    return value


def _optional_number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(name, f"must be a number, got {_describe(value)}", "invalid_type")
    number = float(value)
    too_low = number <= low if low_open else number < low
    if too_low or number > high:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise invalid(name, f"must be {bound} and at most {high:g}, got {value}")
    return number


def _max_tokens(body: Mapping[str, Any], limit: int) -> int | None:
    # `max_completion_tokens` is the newer chat name; both mean the same.
    names = [n for n in ("max_tokens", "max_completion_tokens") if body.get(n) is not None]
    if not names:
        return None
    name = names[0]
    value = body[name]
    if not _is_int(value):
        raise invalid(name, f"must be an integer from 1 to {limit}, got {_describe(value)}", "invalid_type")
    if not 1 <= value <= limit:
        raise invalid(name, f"must be an integer from 1 to {limit} (the server's --max-tokens-limit), got {value}")
    if len(names) == 2 and body["max_completion_tokens"] != value:
        raise invalid("max_completion_tokens", "must equal max_tokens when both are given")
    return int(value)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("stop", f"must be a string or a list of strings, got {_describe(value)}", "invalid_type")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(value)}")
    if any(s == "" for s in value):
        raise invalid("stop", "stop sequences must not be empty strings")
    return tuple(value)


def _seed(body: Mapping[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value):
        raise invalid("seed", f"must be an integer, got {_describe(value)}", "invalid_type")
    return int(value)


def _sampling(body: Mapping[str, Any], max_tokens_limit: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=_max_tokens(body, max_tokens_limit),
        temperature=_optional_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_optional_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stop(body),
        seed=_seed(body),
    )


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", f"must be an object, got {_describe(options)}", "invalid_type")
    if not stream:
        raise invalid("stream_options", "is only allowed when stream is true")
    _reject_unknown(options, ["include_usage"])
    return _optional_bool(options, "include_usage")


def _user(body: Mapping[str, Any]) -> None:
    value = body.get("user")
    if value is not None and not isinstance(value, str):
        raise invalid("user", f"must be a string, got {_describe(value)}", "invalid_type")


# Parameters the server knows but does not implement: accepted only with their
# neutral value(s), so a request never silently gets different behaviour.
_NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
}


def _reject_unsupported_values(body: Mapping[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if name not in body:
            continue
        value = body[name]
        allowed = _NEUTRAL_VALUES[name]
        # bool is an int in Python: `n: true` must not pass as `n: 1`.
        if any(type(value) is type(a) and value == a for a in allowed if a is not None) or value is None:
            continue
        shown = ", ".join("null" if a is None else _describe(a) for a in allowed)
        raise invalid(name, f"is not supported by this server; allowed values: {shown}; got {_describe(value)}", "unsupported_value")


_COMMON_PARAMS = ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user")
_COMPLETION_UNSUPPORTED = ("n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "suffix")
_CHAT_UNSUPPORTED = (
    "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "tools", "tool_choice", "parallel_tool_calls", "response_format",
)  # fmt: skip


# --- Completions -------------------------------------------------------------------


def _prompt(body: Mapping[str, Any]) -> str | tuple[int, ...]:
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("prompt", "is required (a string, or a list of token ids)", "missing_required_parameter")
    value = body["prompt"]
    # OpenAI also takes a batch of prompts; this server answers one per request.
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if any(t < 0 for t in value):
            raise invalid("prompt", "token ids must be >= 0")
        return tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise invalid("prompt", f"only one prompt per request is supported, got {len(value)}", "unsupported_value")
    raise invalid("prompt", f"must be a string or a non-empty list of token ids, got {_describe(value)}", "invalid_type")


def parse_completion_request(body: object, *, max_tokens_limit: int) -> CompletionRequest:
    """Validate a `/v1/completions` body; raise `ApiError` naming the first bad parameter."""
    fields = _require_object(body)
    _reject_unknown(fields, [*_COMMON_PARAMS, "prompt", "echo", *_COMPLETION_UNSUPPORTED])
    model = _model(fields)
    prompt = _prompt(fields)
    sampling = _sampling(fields, max_tokens_limit)
    _reject_unsupported_values(fields, _COMPLETION_UNSUPPORTED)
    _user(fields)
    stream = _optional_bool(fields, "stream")
    return CompletionRequest(
        model=model,
        prompt=prompt,
        sampling=sampling,
        stream=stream,
        include_usage=_include_usage(fields, stream),
        echo=_optional_bool(fields, "echo"),
    )


# --- Chat completions ----------------------------------------------------------------


def _message_content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(
                    f"{where}.content[{i}]",
                    f'only text parts ({{"type": "text", "text": "..."}}) are supported, got {_describe(part)}',
                    "unsupported_value",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where}.content", f"must be a string or a list of text parts, got {_describe(value)}", "invalid_type")


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    if "messages" not in body:
        raise invalid("messages", "is required (a list of {role, content} objects)", "missing_required_parameter")
    value = body["messages"]
    if not isinstance(value, list) or not value:
        raise invalid("messages", f"must be a non-empty list of messages, got {_describe(value)}", "invalid_type")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"must be an object with role and content, got {_describe(message)}", "invalid_type")
        for key in message:
            if key not in ("role", "content", "name"):
                raise invalid(f"{where}.{key}", "is not supported (allowed keys: role, content, name)", "unknown_parameter")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {_describe(role)}")
        if "content" not in message:
            raise invalid(f"{where}.content", "is required", "missing_required_parameter")
        content = _message_content(message["content"], where)
        messages.append(ChatMessage(role="system" if role == "developer" else role, content=content))
    return tuple(messages)


def parse_chat_request(body: object, *, max_tokens_limit: int) -> ChatRequest:
    """Validate a `/v1/chat/completions` body; raise `ApiError` naming the first bad parameter."""
    fields = _require_object(body)
    _reject_unknown(fields, [*_COMMON_PARAMS, "messages", "max_completion_tokens", *_CHAT_UNSUPPORTED])
    model = _model(fields)
    messages = _messages(fields)
    sampling = _sampling(fields, max_tokens_limit)
    _reject_unsupported_values(fields, _CHAT_UNSUPPORTED)
    _user(fields)
    stream = _optional_bool(fields, "stream")
    return ChatRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=_include_usage(fields, stream),
    )


# --- Response bodies -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    """Tokens in the (rendered) prompt."""
    completion_tokens: int
    """Tokens the model generated, including an end-of-sequence token it chose."""

    def body(self) -> dict[str, int]:
        """The OpenAI `usage` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_completion_id(kind: Literal["cmpl", "chatcmpl"]) -> str:
    """A unique response id in OpenAI's format (`cmpl-…` / `chatcmpl-…`)."""
    return f"{kind}-{uuid.uuid4().hex}"


def now() -> int:
    """The `created` timestamp: Unix seconds."""
    return int(time.time())


def completion_body(
    response_id: str, created: int, model: str, text: str, finish_reason: FinishReason, usage: Usage
) -> dict[str, Any]:
    """A complete `text_completion` response."""
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.body(),
    }


def completion_chunk(
    response_id: str, created: int, model: str, text: str, finish_reason: FinishReason | None = None
) -> dict[str, Any]:
    """One streamed `text_completion` chunk."""
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(
    response_id: str, created: int, model: str, content: str, finish_reason: FinishReason, usage: Usage
) -> dict[str, Any]:
    """A complete `chat.completion` response."""
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.body(),
    }


def chat_chunk(
    response_id: str, created: int, model: str, delta: Mapping[str, str], finish_reason: FinishReason | None = None
) -> dict[str, Any]:
    """One streamed `chat.completion.chunk`: the first carries the role, the last the finish reason."""
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(response_id: str, created: int, model: str, usage: Usage, *, chat: bool) -> dict[str, Any]:
    """The last streamed chunk when `stream_options.include_usage` is set: no choices, only usage."""
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.body(),
    }


def models_body(models: Sequence[str], created: int) -> dict[str, Any]:
    """`GET /v1/models`: the models this server serves (the main one first, then its adapters)."""
    return {"object": "list", "data": [model_body(model, created) for model in models]}


def model_body(model: str, created: int) -> dict[str, Any]:
    """One `model` object."""
    return {"id": model, "object": "model", "created": created, "owned_by": "kubetune"}
