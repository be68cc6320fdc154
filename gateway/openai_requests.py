"""Validation of OpenAI request bodies at the boundary: every field typed and range-checked here."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from core.types import MAX_PROMPT_IDS
from engine.chat_template import ROLES
from engine.grammar import GrammarError, json_object_grammar, json_schema_grammar
from engine.types import GenerationRequest, SamplingParams
from gateway.errors import bad_request
from gateway.tool_calls import ToolChoice, parse_tools, render_tool_calls, tool_prompt

MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 1_000_000  # per message / prompt; the body cap bounds the total anyway
MAX_TOKENS_CAP = 1 << 20  # above any context length we could serve
MAX_EMBED_INPUTS = 256
MAX_PROMPTS = 16  # completions: prompts in one request
MAX_CHOICES = 32  # completions: prompts x n (each choice is a generation of its own)
MAX_STOP = 4
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
COMPLETION_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions (chat has none)


# A completion prompt: text, or token ids of the model's vocabulary (checked by the engine).
Prompt = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ParsedGeneration:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] | None = None
    prompts: tuple[Prompt, ...] = ()  # completions: one or more prompts, `n` choices each
    return_token_ids: bool = False  # extension (as in vLLM): the generated token ids with the text
    n: int = 1
    tools: ToolChoice | None = None  # set when the answer is to be read for tool calls

    @property
    def prompt(self) -> Prompt | None:
        return self.prompts[0] if self.prompts else None

    @property
    def n_choices(self) -> int:
        """As OpenAI numbers them: choice `index` answers prompt `index // n`."""
        return max(1, len(self.prompts)) * self.n

    def choice_params(self, index: int) -> SamplingParams:
        """Choice `index`: the j-th of its prompt's `n` gets its own seed (seed + j) so that choices
        differ but a seeded request is reproducible."""
        j = index % self.n
        if j == 0 or self.params.seed is None:
            return self.params
        return replace(self.params, seed=(self.params.seed + j) % (1 << 63))

    def request(self, request_id: str, index: int = 0) -> GenerationRequest:
        """The engine request of choice `index`."""
        params = self.choice_params(index)
        if self.messages is not None:
            return GenerationRequest(request_id, params, messages=self.messages)
        prompt = self.prompts[index // self.n]
        if isinstance(prompt, str):
            return GenerationRequest(request_id, params, prompt=prompt)
        return GenerationRequest(request_id, params, prompt_ids=prompt)


@dataclass(frozen=True, slots=True)
class ParsedEmbeddings:
    model: str
    inputs: tuple[Prompt, ...]  # text or token ids
    encoding_format: str
    dimensions: int | None = None  # truncate each vector to this many and renormalise


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


def _n(body: dict[str, Any]) -> int:
    return _integer(body, "n", 1, MAX_N) or 1


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' must map at most {MAX_LOGIT_BIAS} token ids to biases.", param="logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise bad_request(f"'logit_bias' keys must be token ids; got {key[:20]!r}.", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise bad_request("'logit_bias' values must be numbers between -100 and 100.", param="logit_bias")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = _bool(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return (top or 0) if wanted else None


def _response_format(body: dict[str, Any]) -> str | None:
    """The grammar for `response_format`; a schema llguidance cannot compile is a 400 naming why."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                          param="response_format")
    try:
        if fmt["type"] == "json_object":
            return json_object_grammar()
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise bad_request("'response_format.json_schema' must be an object with a 'schema' object.",
                                  param="response_format.json_schema")
            return json_schema_grammar(spec.get("schema", {}), strict=spec.get("strict") is not False)
    except GrammarError as e:
        raise bad_request(f"response_format: the schema cannot be used: {e}", param="response_format.json_schema",
                          code="invalid_schema") from None
    return None


def _sampling(body: dict[str, Any], *, logprobs: int | None = None, grammar: str | None = None,
              default_max_tokens: int | None = None) -> SamplingParams:
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_CAP)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_CAP)
    if max_tokens is None:
        max_tokens = default_max_tokens
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
        logit_bias=_logit_bias(body),
        logprobs=logprobs,
        grammar=grammar,
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
    if message.get("role") == "assistant" and message.get("tool_calls") is not None:
        # A call the model made earlier goes back in the form the model writes it.
        calls = render_tool_calls(message["tool_calls"], f"messages[{index}].tool_calls")
        return (content + "\n" if isinstance(content, str) and content else "") + calls
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
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise bad_request("'functions' is deprecated and not supported: use 'tools'.", param="functions")
    tools = parse_tools(body)
    grammar = _response_format(body)
    if tools is not None and grammar is not None:
        raise bad_request("'response_format' cannot be combined with tools that may be called.",
                          param="response_format")
    if tools is not None:
        grammar = tools.grammar
        parsed = _with_system_text(parsed, tool_prompt(tools))
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, logprobs=_chat_logprobs(body), grammar=grammar)
    return ParsedGeneration(
        model, params, stream, include_usage, messages=tuple(parsed),
        return_token_ids=_bool(body, "return_token_ids"), n=_n(body), tools=tools,
    )


def _with_system_text(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """The tools' description goes into the system message (one is added when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def parse_completion(raw: Any) -> ParsedGeneration:
    body = _require_object(raw)
    model = _model(body)
    prompts = _prompts(body.get("prompt"))
    for key in ("echo", "suffix"):
        if body.get(key):
            raise bad_request(f"'{key}' is not supported.", param=key)
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' is not supported (use 'n').", param="best_of")
    if body.get("tools") is not None:
        raise bad_request("'tools' are for /v1/chat/completions.", param="tools")
    logprobs = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    stream, include_usage = _stream_flags(body)
    params = _sampling(body, logprobs=logprobs, grammar=_response_format(body),
                       default_max_tokens=COMPLETION_MAX_TOKENS_DEFAULT)
    n = _n(body)
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"At most {MAX_CHOICES} choices in all (prompts x n); got {len(prompts) * n}.", param="n")
    return ParsedGeneration(
        model, params, stream, include_usage, prompts=prompts, return_token_ids=_bool(body, "return_token_ids"),
        n=n,
    )


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


def _ids(value: list[int], param: str) -> tuple[int, ...]:
    """Token ids as sent; the engine checks them against the model's vocabulary (400 naming the id)."""
    if len(value) > MAX_PROMPT_IDS or not all(0 <= i < 1 << 31 for i in value):
        raise bad_request(f"'{param}' must hold 1 to {MAX_PROMPT_IDS} non-negative token ids.", param=param)
    return tuple(value)


def _prompts(prompt: Any) -> tuple[Prompt, ...]:
    """OpenAI's four forms: a string, a list of strings, a list of ids, a list of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not 0 < len(prompt) <= MAX_PROMPTS:
        raise bad_request(f"'prompt' is required: a string, token ids, or a list of 1 to {MAX_PROMPTS} of either.",
                          param="prompt")
    out: list[Prompt] = []
    for p in prompt:
        if isinstance(p, str):
            if len(p) > MAX_TEXT_CHARS:
                raise bad_request("'prompt' is too long.", param="prompt")
            out.append(_text(p, "prompt"))
        elif _is_ids(p):
            out.append(_ids(p, "prompt"))
        else:
            raise bad_request("'prompt' must hold strings or non-empty lists of token ids.", param="prompt")
    return tuple(out)


def parse_embeddings(raw: Any) -> ParsedEmbeddings:
    body = _require_object(raw)
    model = _model(body)
    inputs = body.get("input")
    if isinstance(inputs, str) or _is_ids(inputs):  # one text, or one input as token ids
        inputs = [inputs]
    if (
        not isinstance(inputs, list)
        or not inputs
        or len(inputs) > MAX_EMBED_INPUTS
        or not all((isinstance(s, str) and len(s) <= MAX_TEXT_CHARS) or _is_ids(s) for s in inputs)
    ):
        raise bad_request(
            f"'input' must be a string, token ids, or a list of 1 to {MAX_EMBED_INPUTS} of either.", param="input"
        )
    for text in inputs:
        if not text:  # no tokens: llama.cpp's embed would corrupt the heap (engines refuse it too)
            raise bad_request("'input' must not contain empty strings.", param="input")
        if isinstance(text, str):
            _text(text, "input")
    inputs = [_ids(t, "input") if isinstance(t, list) else t for t in inputs]
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return ParsedEmbeddings(model, tuple(inputs), fmt, _integer(body, "dimensions", 1, 1 << 16))
