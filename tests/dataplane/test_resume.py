"""Table-driven tests of resuming after a mid-stream failure, and of the resuming stream on fakes."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Unavailable
from core.serving import Generation
from core.types import Chunk, FinishReason, GenerationRequest, SamplingParams, Usage
from dataplane.routing.resume import Served, resume_request, resuming


def req(max_tokens: int | None, continuation: str = "") -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(max_tokens=max_tokens), prompt="p", continuation=continuation)


CASES = [
    # (name, request, text so far, tokens so far, expected (continuation, max_tokens) or None)
    ("continues with what was sent", req(10), "Hello", 2, ("Hello", 8)),
    ("continuation adds up", req(10, "Hi"), " there", 3, ("Hi there", 7)),
    ("until the context is full stays so", req(None), "x", 1, ("x", None)),
    ("all tokens sent: nothing to resume", req(4), "abcd", 4, None),
]


@pytest.mark.parametrize(("name", "request_", "text", "n", "expected"), CASES, ids=[c[0] for c in CASES])
def test_resume_request(name, request_, text, n, expected):
    resumed = resume_request(request_, text, n)
    got = None if resumed is None else (resumed.continuation, resumed.params.max_tokens)
    assert got == expected


async def _chunks(*chunks: Chunk, fail: bool = False):
    for c in chunks:
        yield c
    if fail:
        raise Unavailable("holder went away")


def test_a_failed_holder_is_replaced_with_what_was_sent():
    calls: list[tuple[str | None, str, str, list[int]]] = []

    async def reopen(failed: Served, error: Unavailable, text: str, ids: list[int]) -> Served:
        calls.append((failed.node_id, error.message, text, list(ids)))
        rest = _chunks(Chunk(text="!", token_ids=[3], finish_reason=FinishReason.STOP, usage=Usage(5, 1)))
        return Served(Generation("name-b", Chunk(text=" world", token_ids=[2]), rest), "b")

    async def run() -> list[Chunk]:
        first = Chunk(text="Hello", token_ids=[1])
        served = Served(Generation("name-a", first, _chunks(fail=True)), "a")
        return [c async for c in resuming(served, req(10), reopen)]

    out = asyncio.run(run())
    assert calls == [("a", "holder went away", "Hello", [1])]
    assert "".join(c.text for c in out) == " world!"
    assert out[-1].usage == Usage(5, 3)  # every token the client got, whoever produced it


def test_no_replacement_ends_with_the_routers_error():
    async def reopen(failed: Served, error: Unavailable, text: str, ids: list[int]) -> Served:
        raise Unavailable("pipeline stage 1 (b, layers [5, 17)) failed: went silent; no replacement: none")

    async def run() -> list[Chunk]:
        served = Served(Generation("a+b", Chunk(text="x", token_ids=[1]), _chunks(fail=True)), None)
        return [c async for c in resuming(served, req(10), reopen)]

    with pytest.raises(Unavailable, match=r"stage 1 \(b, layers \[5, 17\)\) failed: went silent"):
        asyncio.run(run())


def test_a_stream_with_all_its_tokens_ends_without_reopening():
    async def reopen(failed: Served, error: Unavailable, text: str, ids: list[int]) -> Served:
        raise AssertionError("nothing to resume")

    async def run() -> list[Chunk]:
        served = Served(Generation("a", Chunk(text="x", token_ids=[1]), _chunks(Chunk(text="y", token_ids=[2]), fail=True)), "a")
        return [c async for c in resuming(served, req(2), reopen)]

    out = asyncio.run(run())
    assert out[-1].finish_reason == FinishReason.LENGTH and out[-1].usage == Usage(0, 2)
