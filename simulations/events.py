"""A discrete-event queue with a fake clock: time only moves when the next event runs."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventQueue:
    __slots__ = ("now", "_heap", "_seq", "ran")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0  # FIFO among equal times, so runs are deterministic
        self.ran = 0

    def at(self, when_s: float, fn: Callable[..., None], *args: Any) -> None:
        if when_s < self.now:
            raise ValueError(f"cannot schedule in the past ({when_s} < {self.now})")
        self._seq += 1
        heapq.heappush(self._heap, (when_s, self._seq, fn, args))

    def after(self, delay_s: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + max(0.0, delay_s), fn, *args)

    def run_until(self, end_s: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end_s:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            self.ran += 1
            fn(*args)
        self.now = max(self.now, end_s)
