"""Validation of OpenAI request bodies at the boundary: every field typed and range-checked here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.chat_template import ROLES
from engine.types import SamplingParams
from gateway.errors import bad_request

MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000  # per message / prompt; the body cap bounds the total anyway
MAX_TOKENS_CAP = 1 << 20  # above any context length we could serve
MAX_EMBED_INPUTS = 256
MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class ParsedGeneration:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    return_token_ids: bool = False  # extension (as in vLLM): the generated token ids with the text


@dataclass(frozen=True, slots=True)
class ParsedEmbeddings:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str


def _text(value: str, param: str) -> str:
    """JSON may carry lone surrogates (\\ud800); no engine can encode them, so they stop here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"'{param}' is not valid Unicode (it holds a lone surrogate).", param=param) from None
    return value


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise bad_request("'model' is required and must be a non-empty string.", param="model")
    return _text(model, "model")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{key}' must be a number.", param=key)
    if not lo <= value <= hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi}; got {value}.", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer.", param=key)
    if not lo <= value <= hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi}; got {value}.", param=key)
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be a boolean.", param=key)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)
    ):
        raise bad_request("'stop' must be a string or a list of at most 4 non-empty strings.", param="stop")
    return tuple(_text(s, "stop") for s in stop)


def _unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Only n=1 is supported.", param="n")
    if body.get("tools") or body.get("functions"):
        raise bad_request("Tool and function calling are not supported.", param="tools")
    if body.get("logprobs") not in (None, False, 0):
        raise bad_request("logprobs are not supported.", param="logprobs")


def _sampling(body: dict[str, Any]) -> SamplingParams:
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_CAP)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_CAP)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_integer(body, "top_k", 0, 1 << 20) or 0,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=_integer(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=_stop(body),
        max_tokens=max_tokens,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    return stream, _bool(options, "include_usage")


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        # The array form: only text parts are supported.
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"messages[{index}].content: only text content parts are supported.",
                    param=f"messages[{index}].content",
                )
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise bad_request(
            f"messages[{index}].content must be a string or a list of text parts.",
            param=f"messages[{index}].content",
        )
    if len(text) > MAX_TEXT_CHARS:
        raise bad_request(f"messages[{index}].content is too long.", param=f"messages[{index}].content")
    return _text(text, f"messages[{index}].content")


def parse_chat(raw: Any) -> ParsedGeneration:
    body = _require_object(raw)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"At most {MAX_MESSAGES} messages.", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}.",
                param=f"messages[{i}].role",
            )
        # 'developer' is OpenAI's newer name for 'system'; chat templates know only the latter.
        parsed.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    _unsupported(body)
    stream, include_usage = _stream_flags(body)
    return ParsedGeneration(
        model, _sampling(body), stream, include_usage, messages=tuple(parsed),
        return_token_ids=_bool(body, "return_token_ids"),
    )


def parse_completion(raw: Any) -> ParsedGeneration:
    body = _require_object(raw)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string (or a list of one string).", param="prompt")
    if len(prompt) > MAX_TEXT_CHARS:
        raise bad_request("'prompt' is too long.", param="prompt")
    _text(prompt, "prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
        raise bad_request("echo, suffix and best_of are not supported.")
    _unsupported(body)
    stream, include_usage = _stream_flags(body)
    return ParsedGeneration(
        model, _sampling(body), stream, include_usage, prompt=prompt, return_token_ids=_bool(body, "return_token_ids")
    )


def parse_embeddings(raw: Any) -> ParsedEmbeddings:
    body = _require_object(raw)
    model = _model(body)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if (
        not isinstance(inputs, list)
        or not inputs
        or len(inputs) > MAX_EMBED_INPUTS
        or not all(isinstance(s, str) and len(s) <= MAX_TEXT_CHARS for s in inputs)
    ):
        raise bad_request(
            f"'input' must be a string or a list of 1 to {MAX_EMBED_INPUTS} strings.", param="input"
        )
    for text in inputs:
        if not text:  # no tokens: llama.cpp's embed would corrupt the heap (engines refuse it too)
            raise bad_request("'input' must not contain empty strings.", param="input")
        _text(text, "input")
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return ParsedEmbeddings(model, tuple(inputs), fmt)
