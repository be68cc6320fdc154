"""Detecting a hung peer within seconds: heartbeats on server streams, deadlines from measured gaps.

A server stream (Generate, PipelineGenerate, Forward's replies) writes a heartbeat frame `{"hb": 1}`
whenever it has written nothing for `HEARTBEAT_S`, so a live peer is never silent for long, even while
it queues or processes a long prompt. A client waits for the next frame (heartbeat or not) at most
`Silence.deadline_s()`: `HUNG_FACTOR` x the p95 of the recent gaps it has measured on that stream
(`step_deadline_s`, pure), with a floor. A holder or stage that is SIGSTOPped or wedged is detected
within about `HUNG_FLOOR_S` (issue 14: a hung stage is declared failed within 3 s on loopback), and
one whose own steps are slow gets proportionally longer. Dead connections without a stream in flight
are caught by gRPC keepalive (`rpc.CHANNEL_OPTIONS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dataplane import rpc

HEARTBEAT_S = 0.5
HUNG_FLOOR_S = 2.0  # 4 heartbeats missed: under 3 s to detect, with room to re-route and re-prefill
HUNG_FACTOR = 4.0  # x the p95 of the recent gaps
GAP_WINDOW = 64  # recent gaps the p95 is taken over
HUNG_CEILING_S = 60.0
HEARTBEAT = rpc.pack({"hb": 1})


def is_heartbeat(obj: dict[str, Any]) -> bool:
    return obj.get("hb") == 1 and len(obj) == 1


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def step_deadline_s(gaps: Sequence[float], floor_s: float = HUNG_FLOOR_S, factor: float = HUNG_FACTOR,
                    ceiling_s: float = HUNG_CEILING_S) -> float:
    """How long a peer may stay silent: `factor` x the p95 of its recent gaps, within [floor, ceiling]."""
    return min(ceiling_s, max(floor_s, factor * p95(gaps)))


@dataclass(slots=True)
class Silence:
    """The gaps between a stream's frames, and how long the next one may take (`step_deadline_s`)."""

    clock: Callable[[], float] = time.monotonic
    floor_s: float = HUNG_FLOOR_S
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=GAP_WINDOW))
    _last: float | None = field(default=None)

    def start(self) -> None:
        """A wait begins now (the time before it is no silence of the peer's)."""
        self._last = self.clock()

    def heard(self) -> None:
        now = self.clock()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def deadline_s(self) -> float:
        return step_deadline_s(self.gaps, self.floor_s)


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
