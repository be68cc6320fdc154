"""Combines the forward steps that worker threads submit into batches (flat combining).

Each thread submits its session's step and waits. Whoever finds the model idle becomes the leader:
it takes every step queued so far, runs them as one batch outside the lock, hands out the results
and wakes the others; a waiter whose step is still pending then leads the next batch. One stream
pays only a lock round trip; N streams in flight decode together, so one weight read serves N tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(slots=True, eq=False)
class Step:
    """One session's new positions: x is token ids [T] or hidden states [T, hidden]."""

    slot: int
    x: torch.Tensor
    start_pos: int
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class StepCombiner:
    def __init__(self, run_batch: Callable[[list[Step]], None]) -> None:
        self._run_batch = run_batch  # sets result (or error) on every step it is given
        self._cond = threading.Condition()
        self._queue: list[Step] = []
        self._running = False

    def submit(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """Runs `steps` (together with whatever else is queued) and returns their results in order."""
        with self._cond:
            self._queue.extend(steps)
            while not all(s.done for s in steps):
                if self._running:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue, []
                self._running = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        for s in steps:
            if s.error is not None:
                raise s.error
        return [s.result for s in steps]  # type: ignore[misc]

    def _run(self, batch: list[Step]) -> None:
        try:
            self._run_batch(batch)
        except BaseException as e:  # noqa: BLE001 - hand the failure to every waiter, not only the leader
            for s in batch:
                if not s.done:
                    s.error = e
        for s in batch:
            s.done = True
