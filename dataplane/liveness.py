"""Detecting a hung peer within seconds: heartbeats on server streams, deadlines from measured gaps.

A server stream (Generate, PipelineGenerate, Forward's replies) writes a heartbeat frame `{"hb": 1}`
whenever it has written nothing for `HEARTBEAT_S`, so a live peer is never silent for long, even while
it queues or processes a long prompt. A client waits for the next frame (heartbeat or not) at most
`Silence.deadline_s()`: a multiple of the usual gap it has measured on that stream (and half again the
longest), with a floor. A
holder or stage that is SIGSTOPped or wedged is detected within about `HUNG_FLOOR_S` (issue 11,
finding 10), and one whose own loop is slow gets proportionally longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from dataplane import rpc

HEARTBEAT_S = 0.5
HUNG_FLOOR_S = 3.0
HUNG_FACTOR = 4.0  # x the usual gap (EWMA)
LONGEST_FACTOR = 1.5  # x the longest gap seen
HUNG_CEILING_S = 60.0
HEARTBEAT = rpc.pack({"hb": 1})


def is_heartbeat(obj: dict[str, Any]) -> bool:
    return obj.get("hb") == 1 and len(obj) == 1


@dataclass(slots=True)
class Silence:
    """How long a stream may stay silent: HUNG_FACTOR x the usual gap or LONGEST_FACTOR x the longest,
    within [floor, ceiling]."""

    clock: Callable[[], float] = time.monotonic
    floor_s: float = HUNG_FLOOR_S
    longest_gap_s: float = 0.0
    usual_gap_s: float = 0.0
    _last: float | None = field(default=None)

    def start(self) -> None:
        """A wait begins now (the time before it is no silence of the peer's)."""
        self._last = self.clock()

    def heard(self) -> None:
        now = self.clock()
        if self._last is not None:
            gap = now - self._last
            self.longest_gap_s = max(self.longest_gap_s, gap)
            self.usual_gap_s = 0.7 * self.usual_gap_s + 0.3 * gap
        self._last = now

    def deadline_s(self) -> float:
        grown = max(HUNG_FACTOR * self.usual_gap_s, LONGEST_FACTOR * self.longest_gap_s)
        return min(HUNG_CEILING_S, max(self.floor_s, grown))


class Beating:
    """Writes through `context` and fills every silence longer than `interval_s` with a heartbeat.

    Use as `async with Beating(context) as out: await out.write(frame)`; the handler itself stays a
    plain coroutine in one task (no generator driven from another task)."""

    def __init__(self, context: grpc.aio.ServicerContext, interval_s: float = HEARTBEAT_S) -> None:
        self._context = context
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self._last = time.monotonic()
        self._task: asyncio.Task | None = None

    async def write(self, frame: bytes) -> None:
        async with self._lock:
            await self._context.write(frame)
            self._last = time.monotonic()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self._last + self._interval_s - time.monotonic()))
            if time.monotonic() - self._last >= self._interval_s:
                await self.write(HEARTBEAT)

    async def __aenter__(self) -> Beating:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
