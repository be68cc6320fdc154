"""Table-driven tests of waiting out a pipeline stage whose KV pool is spent (`routing/kv_wait.py`), and
of a resuming stream that meets such a stage's Busy, on fakes."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Busy, Unavailable
from core.serving import Generation
from core.types import Chunk, FinishReason, GenerationRequest, SamplingParams
from dataplane.routing.kv_wait import BUDGET_S, JITTER, MAX_DELAY_S, GiveUp, Wait, decide
from dataplane.routing.resume import Served, resuming
from placement.cluster import Stage

CASES = [
    # (name, retry_after_s, since, now, attempts, expected)
    ("the stream's own Busy: wait the stage's retry-after", 1, 100.0, 100.0, 0, Wait(1.0)),
    ("retry-after longer than the backoff is respected", 3, 100.0, 101.0, 1, Wait(3.0)),
    ("each replay that finds no room doubles the wait", 1, 100.0, 102.0, 2, Wait(2.0)),
    ("the wait stops growing", 1, 100.0, 110.0, 9, Wait(MAX_DELAY_S)),
    ("a clock that went back counts as no wait yet", 1, 100.0, 90.0, 0, Wait(1.0)),
    ("a wait that would end past the budget: give up", 1, 100.0, 100.0 + BUDGET_S - 0.5, 3, GiveUp(BUDGET_S - 0.5)),
    ("the budget spent: give up", 1, 100.0, 100.0 + BUDGET_S, 0, GiveUp(BUDGET_S)),
]


@pytest.mark.parametrize(("name", "retry_after_s", "since", "now", "attempts", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_decide(name, retry_after_s, since, now, attempts, expected):
    assert decide(retry_after_s, since, now, attempts) == expected


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 2.0 * (1 - JITTER)), (0.5, 2.0), (0.999999, 2.0 * (1 + JITTER))])
def test_the_backoff_is_spread_by_the_draw(draw, expected):
    step = decide(0, 100.0, 102.0, 2, draw=draw)
    assert isinstance(step, Wait) and step.delay_s == pytest.approx(expected, rel=1e-5)


def test_a_spread_wait_never_goes_under_the_stages_retry_after():
    assert decide(1, 100.0, 100.0, 0, draw=0.0) == Wait(1.0)  # backoff 0.5 * 0.75, retry-after 1


def test_waits_add_up_to_at_most_the_budget():
    now, attempts = 0.0, 0
    while isinstance(step := decide(1, 0.0, now, attempts), Wait):
        now, attempts = now + step.delay_s, attempts + 1
    assert now <= BUDGET_S and attempts > 10


CHAIN = (Stage("a" * 16, 0, 15), Stage("b" * 16, 15, 30))


def req() -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(max_tokens=10), prompt="p")


async def _chunks(*chunks: Chunk, error: Exception | None = None):
    for c in chunks:
        yield c
    if error is not None:
        raise error


def test_a_pipelines_busy_mid_stream_is_replayed_with_the_ids_so_far():
    calls: list[tuple[str, str, list[int]]] = []

    async def reopen(failed: Served, error: Unavailable | Busy, text: str, ids: list[int]) -> Served:
        calls.append((type(error).__name__, text, list(ids)))
        rest = _chunks(Chunk(text="!", token_ids=[3], finish_reason=FinishReason.STOP))
        return Served(Generation("a+b", Chunk(text=" world", token_ids=[2]), rest), None, CHAIN)

    async def run() -> list[Chunk]:
        busy = Busy(1, "KV cache full")
        served = Served(Generation("a+b", Chunk(text="Hello", token_ids=[1]), _chunks(error=busy)), None, CHAIN)
        return [c async for c in resuming(served, req(), reopen)]

    out = asyncio.run(run())
    assert calls == [("Busy", "Hello", [1])]
    assert "".join(c.text for c in out) == " world!"


def test_a_busy_that_could_not_be_waited_out_ends_the_stream_with_that_busy():
    async def reopen(failed: Served, error: Unavailable | Busy, text: str, ids: list[int]) -> Served:
        assert isinstance(error, Busy)
        raise error

    async def run() -> list[Chunk]:
        served = Served(Generation("a+b", Chunk(text="x", token_ids=[1]), _chunks(error=Busy(2, "KV cache full"))),
                        None, CHAIN)
        return [c async for c in resuming(served, req(), reopen)]

    with pytest.raises(Busy, match="KV cache full"):
        asyncio.run(run())


def test_a_whole_model_holders_busy_is_not_replayed():
    async def reopen(failed: Served, error: Unavailable | Busy, text: str, ids: list[int]) -> Served:
        raise AssertionError("a whole-model holder waits for its blocks itself")

    async def run() -> list[Chunk]:
        served = Served(Generation("w", Chunk(text="x", token_ids=[1]), _chunks(error=Busy(1))), "w")
        return [c async for c in resuming(served, req(), reopen)]

    with pytest.raises(Busy):
        asyncio.run(run())
