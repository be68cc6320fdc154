"""The request an upstream gets and the chunks its answer becomes (pure).

The request is the client's own body (`GenerationRequest.passthrough`), every field as the client sent
it, with only what the mesh owns set: `model` (the served name), `n` (the gateway opens one generation
per choice), `seed` of choices after the first, `stream`/`stream_options.include_usage`, and, when a
stream resumes after a failed holder, the text so far and the tokens left.

The answer's events become `Chunk`s: text, finish reason and usage, log probabilities, token ids (vLLM's
`return_token_ids`), and tool calls, written back in the Hermes form the gateway reads them from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core.types import Chunk, FinishReason, GenerationRequest, TokenLogprob, Usage

MAX_PIECE_BYTES = 256
MAX_TOP = 20
MAX_IDS_PER_EVENT = 4096


class BadEvent(ValueError):
    """An event of the upstream's answer that is not an OpenAI completion (chunk)."""


def request_body(request: GenerationRequest, served_name: str) -> tuple[dict[str, Any], bool]:
    """What the upstream is sent, from the client's body (or from the parsed request when there is none,
    e.g. a peer of an older version), and whether to stream it: unless the client asked for one whole
    answer (then usage and tool calls come exactly as the upstream gives them)."""
    body: dict[str, Any] = {}
    if request.passthrough:
        loaded = json.loads(request.passthrough)
        body = loaded if isinstance(loaded, dict) else {}
    stream = bool(body.get("stream", False)) if body else True
    chat = request.messages is not None
    if chat and "messages" not in body:
        body["messages"] = [dict(m) for m in request.messages or ()]
        _params(body, request)
    elif not chat:  # the gateway opens one generation per prompt of a list: this one's prompt
        if "prompt" not in body:
            _params(body, request)
        prompt_ids = getattr(request, "prompt_ids", None)
        body["prompt"] = request.prompt if request.prompt is not None else list(prompt_ids or ())
    body["model"] = served_name
    if "n" in body:
        body["n"] = 1
    if "seed" in body and request.params.seed is not None:
        body["seed"] = request.params.seed  # choice i of n has seed + i
    body["stream"] = stream
    if stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    if request.continuation:  # a failed holder's text: this one continues it
        _continue(body, request, chat)
    return body, stream


def _params(body: dict[str, Any], request: GenerationRequest) -> None:
    p = request.params
    body.update(temperature=p.temperature, top_p=p.top_p)
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty


def _continue(body: dict[str, Any], request: GenerationRequest, chat: bool) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and request.params.max_tokens is not None:
            body[key] = request.params.max_tokens  # reduced by the router by the tokens already sent
    if chat:
        messages = body.get("messages")
        if isinstance(messages, list):
            # vLLM and SGLang continue a final assistant message when asked to
            body["messages"] = [*messages, {"role": "assistant", "content": request.continuation}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
    elif isinstance(body.get("prompt"), str):
        body["prompt"] = body["prompt"] + request.continuation


def _finish(value: Any) -> FinishReason | None:
    if value is None:
        return None
    return FinishReason.LENGTH if value == "length" else FinishReason.STOP  # stop, tool_calls, eos, ...


def _piece(item: dict[str, Any]) -> bytes:
    raw = item.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw[:MAX_PIECE_BYTES])
    token = item.get("token")
    return token.encode("utf-8", "replace")[:MAX_PIECE_BYTES] if isinstance(token, str) else b""


def _float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return max(-1e30, min(0.0, float(value)))
    return -1e30


def _logprobs(value: Any) -> list[TokenLogprob]:
    """Chat (`content: [{token, logprob, bytes, top_logprobs}]`) or completion (`tokens`,
    `token_logprobs`, `top_logprobs: [{token: logprob}]`) log probabilities."""
    if not isinstance(value, dict):
        return []
    out: list[TokenLogprob] = []
    content = value.get("content")
    if isinstance(content, list):
        for item in content[:MAX_IDS_PER_EVENT]:
            if isinstance(item, dict):
                raw_tops = item.get("top_logprobs")
                item_tops = raw_tops if isinstance(raw_tops, list) else []
                top = tuple((_piece(t), _float(t.get("logprob"))) for t in item_tops[:MAX_TOP] if isinstance(t, dict))
                out.append(TokenLogprob(_piece(item), _float(item.get("logprob")), top))
        return out
    tokens, lps, tops = value.get("tokens"), value.get("token_logprobs"), value.get("top_logprobs")
    if isinstance(tokens, list) and isinstance(lps, list):
        for i, (tok, lp) in enumerate(zip(tokens[:MAX_IDS_PER_EVENT], lps, strict=False)):
            alts = tops[i] if isinstance(tops, list) and i < len(tops) and isinstance(tops[i], dict) else {}
            top = tuple((str(t).encode()[:MAX_PIECE_BYTES], _float(v)) for t, v in list(alts.items())[:MAX_TOP])
            out.append(TokenLogprob(str(tok).encode()[:MAX_PIECE_BYTES], _float(lp), top))
    return out


def _ids(value: Any) -> list[int]:
    if isinstance(value, list) and len(value) <= MAX_IDS_PER_EVENT and all(
            type(i) is int and 0 <= i < 1 << 31 for i in value):
        return list(value)
    return []


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    p, c = value.get("prompt_tokens"), value.get("completion_tokens")
    if not (type(p) is int and type(c) is int and 0 <= p < 1 << 40 and 0 <= c < 1 << 40):
        return None
    details = value.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(p, c, cached if type(cached) is int and 0 <= cached <= p else 0)


@dataclass(slots=True)
class _Call:
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class AnswerReader:
    """Reads one answer's events (streamed chunks, or one whole response) into chunks. The finish
    reason and usage are held back to the last chunk (`end`), as the gateway wants them there."""

    chat: bool
    finish: FinishReason | None = None
    usage: Usage | None = None
    n_events: int = 0  # events that carried text: the completion tokens when the upstream counts none
    calls: dict[int, _Call] = field(default_factory=dict)

    def event(self, obj: Any) -> Chunk | None:
        """One parsed event (a chat.completion.chunk, text_completion, or a whole response)."""
        if not isinstance(obj, dict):
            raise BadEvent("an event that is not a JSON object")
        if "error" in obj and "choices" not in obj:
            raise BadEvent("error")  # the caller reads the message
        usage = _usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            if usage is not None:
                return None
            raise BadEvent("an event without choices")
        if not choices:
            return None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise BadEvent("a choice that is not an object")
        part = choice.get("delta", choice.get("message")) if self.chat else choice
        if not isinstance(part, dict):
            raise BadEvent("a choice without delta or message")
        text = part.get("content") if self.chat else part.get("text")
        text = text if isinstance(text, str) else ""
        self._tool_calls(part.get("tool_calls"))
        self.finish = _finish(choice.get("finish_reason")) or self.finish
        ids = _ids(choice.get("token_ids"))
        logprobs = _logprobs(choice.get("logprobs"))
        if not (text or ids or logprobs):
            return None
        self.n_events += 1
        return Chunk(text=text, token_ids=ids, logprobs=logprobs)

    def _tool_calls(self, calls: Any) -> None:
        if not isinstance(calls, list):
            return
        for i, call in enumerate(calls[:64]):
            if not isinstance(call, dict):
                continue
            index = call.get("index", i)
            slot = self.calls.setdefault(index if type(index) is int else i, _Call())
            fn = call.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    slot.name += fn["name"]
                args = fn.get("arguments")
                if isinstance(args, str):
                    slot.arguments += args
                elif isinstance(args, dict):
                    slot.arguments += json.dumps(args)

    def end(self) -> list[Chunk]:
        """The last chunks: tool calls (as Hermes text), then finish reason and usage."""
        out = []
        if self.calls:
            text = ""
            for _, call in sorted(self.calls.items()):
                try:
                    args = json.loads(call.arguments) if call.arguments else {}
                except ValueError:
                    args = call.arguments
                text += "<tool_call>\n" + json.dumps({"name": call.name, "arguments": args},
                                                     separators=(",", ":")) + "\n</tool_call>"
            out.append(Chunk(text=text))
        usage = self.usage or Usage(0, self.n_events)
        out.append(Chunk(finish_reason=self.finish or FinishReason.STOP, usage=usage))
        return out
