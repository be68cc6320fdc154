"""The router's wait for a pipeline stage's KV blocks (`MeshRouter._when_room`, `_open`), with no
processes: the pipeline opener is a fake, the clock and the sleeps are a fake clock, and the jitter
draw is passed in. Before a first token a stage's Busy is waited out and replayed, a refusal is a Busy
at once (no wait), a full waiting room is a Busy at once, and waiting stops within the budget. After a
stage fails mid-stream, a replacement chain that answers Busy is waited out the same way."""

from __future__ import annotations

import asyncio

import pytest
from routing_builders import M, node

from core.errors import Busy, Refused, Unavailable
from core.serving import Generation
from core.types import Chunk, FinishReason, GenerationRequest, SamplingParams
from dataplane.channels import PeerChannels
from dataplane.routing import kv_wait
from dataplane.routing import router as router_module
from dataplane.routing.resume import Served
from dataplane.routing.retry import Attempts
from dataplane.routing.router import MeshRouter
from dataplane.routing.view import Target
from engine.local_models import LocalModels
from placement.cluster import Stage

ME = node("me", digest="")
RANGE = node("s0", start=0, end=15)  # a range only: nobody holds the model whole, so a chain is opened
TARGET = Target(M, "m", 2048)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _setup(monkeypatch: pytest.MonkeyPatch, outcomes: list[BaseException | None]) -> tuple[MeshRouter, FakeTime, list[int]]:
    """A router whose `_open_pipeline` raises or returns per `outcomes` (None: a chain opened)."""
    t = FakeTime()
    monkeypatch.setattr(router_module.asyncio, "sleep", t.sleep)
    router = MeshRouter("me", LocalModels(), lambda: ME, lambda: [RANGE], PeerChannels("t"), dict, clock=t.clock,
                        draw=lambda: 0.5)
    calls: list[int] = []

    async def open_pipeline(view, target, available, request, exclude, resume):  # noqa: ANN001, ANN202
        calls.append(len(resume))
        outcome = outcomes[min(len(calls), len(outcomes)) - 1]
        if outcome is not None:
            raise outcome
        return Served(None, None, (), request=request)  # type: ignore[arg-type]

    monkeypatch.setattr(router, "_open_pipeline", open_pipeline)
    return router, t, calls


def _request() -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(max_tokens=4), prompt="p")


def _open(router: MeshRouter) -> Served:
    return asyncio.run(router._open(router.view(), TARGET, ["m"], _request(), Attempts()))


def test_a_busy_before_the_first_token_is_waited_out_and_the_chain_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    router, t, calls = _setup(monkeypatch, [Busy(1, "KV cache full"), Busy(1, "KV cache full"), None])
    served = _open(router)
    assert served.request is not None and len(calls) == 3
    assert t.sleeps == [1.0, 1.0]  # the stage's retry-after beats backoffs of 0.5 and 1.0
    assert router._waiting == {}  # the waiting room is left empty


def test_a_refusal_before_the_first_token_is_a_busy_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    router, t, calls = _setup(monkeypatch, [Refused("UNIMPLEMENTED: no pipeline service")])
    with pytest.raises(Busy):
        _open(router)
    assert len(calls) == 1 and t.sleeps == []  # not waited on: it would not clear by waiting


def test_a_full_waiting_room_is_a_busy_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    router, t, calls = _setup(monkeypatch, [Busy(1, "KV cache full"), None])
    router._waiting[M] = kv_wait.MAX_WAITING
    with pytest.raises(Busy, match="KV cache full"):
        _open(router)
    assert len(calls) == 1 and t.sleeps == []
    assert router._waiting[M] == kv_wait.MAX_WAITING  # the others' places are left as they were


def test_waiting_gives_up_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    router, t, calls = _setup(monkeypatch, [Busy(1, "KV cache full")])
    with pytest.raises(Busy, match="KV cache full"):
        _open(router)
    assert sum(t.sleeps) <= kv_wait.BUDGET_S and len(calls) > 10
    assert max(t.sleeps) == kv_wait.MAX_DELAY_S and router._waiting == {}


async def _stream(*chunks: Chunk, fail: str = ""):  # noqa: ANN202
    for c in chunks:
        yield c
    if fail:
        raise Unavailable(fail)


def test_a_busy_replacement_after_a_stage_failed_is_waited_out_and_the_stream_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stage 1 of the chain goes silent after one token; the replacement chain is full at first (Busy),
    then has room: the stream resumes from the id it had, instead of ending with "no replacement"."""
    first = Served(Generation("s0+s1", Chunk(text="a", token_ids=[1]), _stream(fail="next stage 5331aaaa went silent")),
                   None, (Stage("s0" + "0" * 8, 0, 15), Stage("5331aaaa" + "0" * 8, 15, 30)), request=_request())
    done = Chunk(text="b", token_ids=[2], finish_reason=FinishReason.STOP)
    replacement = Served(Generation("s0+s2", done, _stream()), None, (), request=_request())
    router, t, calls = _setup(monkeypatch, [None, Busy(1, "KV cache full"), None])
    opened = iter([first, None, replacement])

    async def open_pipeline(view, target, available, request, exclude, resume):  # noqa: ANN001, ANN202
        calls.append(len(resume))
        served = next(opened)
        if served is None:
            raise Busy(1, "KV cache full")
        return served

    monkeypatch.setattr(router, "_open_pipeline", open_pipeline)

    async def run() -> list[Chunk]:
        generation = await router.open_generation("m", _request())
        return [generation.first, *[c async for c in generation.rest]]

    monkeypatch.setattr(router, "_find", lambda model: _found(router))
    out = asyncio.run(run())
    assert "".join(c.text for c in out) == "ab" and out[-1].finish_reason == FinishReason.STOP
    assert calls == [0, 1, 1]  # opened, then the replacement twice with the one id sent so far
    assert t.sleeps == [1.0] and router._waiting == {}


async def _found(router: MeshRouter):  # noqa: ANN202
    return router.view(), TARGET, ["m"]
