"""One chat or text completion answered: `n` choices per prompt (one generation each, in turn), joined or streamed
as Server-Sent Events, with log probabilities and tool calls in OpenAI's shapes.

The choices run one after another on the same route: a llama.cpp holder then reuses the prompt's KV
cache (and its saved logits, for a seeded request) instead of prefilling it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from core.errors import MeshError
from core.serving import Generation
from core.types import Chunk, TokenLogprob, Usage
from gateway import openai_responses as out
from gateway.errors import http_error
from gateway.openai_requests import ParsedGeneration
from gateway.tool_calls import ToolCallReader, read_tool_calls

OpenChoice = Callable[[int], Awaitable[Generation]]  # choice index -> its admitted generation
OnChunk = Callable[[Chunk], None]


@dataclass(slots=True)
class _Choice:
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: Chunk = field(default_factory=Chunk)

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        self.ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk


def _total(usages: list[Usage | None], n: int) -> Usage | None:
    known = [u for u in usages if u is not None]
    if not known:
        return None
    # Each prompt counts once whatever n is (as OpenAI counts it): its first choice's figure; completions add up.
    firsts = [u for u in usages[::n] if u is not None] or known[:1]
    return Usage(sum(u.prompt_tokens for u in firsts), sum(u.completion_tokens for u in known),
                 sum(u.cached_tokens for u in firsts))


def _finish_reason(choice: _Choice, has_calls: bool) -> str:
    finish = str(choice.last.finish_reason or "stop")
    return "tool_calls" if has_calls and finish == "stop" else finish


async def _each(first: Generation, n: int, open_choice: OpenChoice) -> Any:
    """The n generations in turn; each is closed before the next opens."""
    for index in range(n):
        generation = first if index == 0 else await open_choice(index)
        try:
            yield index, generation
        finally:
            await generation.aclose()


async def respond_joined(parsed: ParsedGeneration, chat: bool, cid: str, created: int, model: str,
                         first: Generation, open_choice: OpenChoice, on_chunk: OnChunk) -> dict:
    choices = []
    usages: list[Usage | None] = []
    async for index, generation in _each(first, parsed.n_choices, open_choice):
        choice = _Choice()
        async for chunk in generation.chunks():
            on_chunk(chunk)
            choice.add(chunk)
        usages.append(choice.last.usage)
        text = "".join(choice.texts)
        logprobs = parsed.params.logprobs is not None
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls: list[dict[str, Any]] = []
            if parsed.tools is not None:
                content, calls = read_tool_calls(text)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
            body = {"index": index, "message": message, "finish_reason": _finish_reason(choice, bool(calls)),
                    "logprobs": out.chat_logprobs(choice.logprobs) if logprobs else None}
        else:
            body = {"index": index, "text": text, "finish_reason": _finish_reason(choice, False),
                    "logprobs": out.completion_logprobs(choice.logprobs) if logprobs else None}
        if parsed.return_token_ids:
            body["token_ids"] = choice.ids
        choices.append(body)
    return {
        "id": cid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": out.usage_dict(_total(usages, parsed.n)),
    }


class _Stream:
    def __init__(self, response: web.StreamResponse, parsed: ParsedGeneration, chat: bool, cid: str,
                 created: int, model: str) -> None:
        self.response, self.parsed, self.chat = response, parsed, chat
        self.cid, self.created, self.model = cid, created, model

    async def chat_event(self, index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> None:
        payload = out.chat_chunk(self.cid, self.model, self.created, delta, finish)
        payload["choices"][0].update(index=index, logprobs=logprobs)
        await self.response.write(out.sse(payload))

    async def text_event(self, index: int, text: str, finish: str | None, extra: dict | None = None) -> None:
        payload = out.text_completion(self.cid, self.model, self.created, text, finish, None)
        payload["choices"][0].update(index=index, **(extra or {}))
        await self.response.write(out.sse(payload))

    async def choice(self, index: int, generation: Generation, on_chunk: OnChunk) -> Usage | None:
        parsed, chat = self.parsed, self.chat
        reader = ToolCallReader() if chat and parsed.tools is not None else None
        if chat:
            await self.chat_event(index, {"role": "assistant", "content": ""}, None)
        last, offset = Chunk(), 0
        async for chunk in generation.chunks():
            on_chunk(chunk)
            last = chunk
            logprobs = chunk.logprobs if parsed.params.logprobs is not None and chunk.logprobs else None
            ids = {"token_ids": chunk.token_ids} if parsed.return_token_ids and chunk.token_ids else {}
            if not chat:
                if chunk.text or ids or logprobs:
                    extra: dict[str, Any] = dict(ids)
                    if logprobs:
                        extra["logprobs"] = out.completion_logprobs(logprobs, offset)
                    await self.text_event(index, chunk.text, None, extra)
                    offset += len(chunk.text)
                continue
            lp = out.chat_logprobs(logprobs) if logprobs else None
            if reader is None:
                if chunk.text or ids or lp:
                    await self._chat_delta(index, {"content": chunk.text, **ids}, lp)
                continue
            for kind, value in reader.feed(chunk.text):
                await self._chat_delta(index, {"content": value} if kind == "content" else {"tool_calls": [value]}, lp)
                lp = None
            if lp is not None:  # the text was held back: the logprobs go out now, the text later
                await self._chat_delta(index, {}, lp)
        if reader is not None:
            for _, value in reader.finish():
                await self._chat_delta(index, {"content": value}, None)
        calls = bool(reader is not None and reader.complete_calls)
        finish = str(last.finish_reason or "stop")
        finish = "tool_calls" if calls and finish == "stop" else finish
        if chat:
            await self.chat_event(index, {}, finish)
        else:
            await self.text_event(index, "", finish)
        return last.usage

    async def _chat_delta(self, index: int, delta: dict, logprobs: dict | None) -> None:
        ids = delta.pop("token_ids", None)
        payload = out.chat_chunk(self.cid, self.model, self.created, delta, None)
        payload["choices"][0].update(index=index, logprobs=logprobs)
        if ids is not None:
            payload["choices"][0]["token_ids"] = ids
        await self.response.write(out.sse(payload))


async def respond_streamed(response: web.StreamResponse, parsed: ParsedGeneration, chat: bool, cid: str,
                           created: int, model: str, first: Generation, open_choice: OpenChoice,
                           on_chunk: OnChunk) -> bool:
    """Writes the stream; False when it ended with an error event (headers were gone already)."""
    stream = _Stream(response, parsed, chat, cid, created, model)
    usages: list[Usage | None] = []
    try:
        async for index, generation in _each(first, parsed.n_choices, open_choice):
            usages.append(await stream.choice(index, generation, on_chunk))
    except MeshError as e:
        await response.write(out.sse(http_error(e).body()))
        await response.write(out.sse("[DONE]"))
        return False
    if parsed.include_usage:
        usage = _total(usages, parsed.n)
        usage_chunk = (
            out.chat_chunk(cid, model, created, {}, None, usage)
            if chat
            else {**out.text_completion(cid, model, created, "", None, usage), "choices": []}
        )
        await response.write(out.sse(usage_chunk))
    await response.write(out.sse("[DONE]"))
    await response.write_eof()
    return True
