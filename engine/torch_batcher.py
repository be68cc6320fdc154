"""Combines the forward steps that worker threads submit into batches (flat combining).

Each thread submits its session's step and waits. Whoever finds the model idle becomes the leader:
it takes every step queued so far, runs them as one batch outside the lock, hands out the results
and wakes the others; a waiter whose step is still pending then leads the next batch. One stream
pays only a lock round trip; N streams in flight decode together, so one weight read serves N tokens.

Threads resubmit at slightly different times (sampling, detokenizing), so a leader that finds fewer
steps queued than sessions open waits up to `gather_s` for the rest before it runs: without that,
four streams settle into batches of one or two.

Sessions driven round a pipeline of R stages are batched at most 1/R of them at a time by the stage
that drives them (`opened(slot, ring=R)`), so that R micro-batches keep every stage busy. All of them
in one batch is lockstep, each stage idle while the others run, and nothing broke lockstep once it
formed: runs of 4 streams through 2 stages fell to 45-55 tok/s against 70-80 (docs/benchmarks.md).

A pipeline stage gathers its decode steps on its event loop instead (dataplane/stage_batcher.py) and
runs them with `run_now`: on the calling thread, with no gathering, or not at all while another
batch is in flight there (a prompt chunk), so that the loop never waits behind one.

A batch may leave a step unfinished (a long prompt runs one chunk per batch, between other
sessions' decode steps: continuous batching with chunked prefill). Such a step goes back to the
front of the queue, and its thread keeps waiting or leads the next batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(slots=True, eq=False)
class Step:
    """One session's new positions: x is token ids [T] or hidden states [T, hidden]."""

    slot: int
    x: torch.Tensor
    start_pos: int
    last: str = "last"  # ShardModel.prefill's `last`; "hidden" for embeddings
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = field(default=False)  # set by run_batch with result or error
    offset: int = 0  # positions of x already run (chunked prefill)
    parts: list[torch.Tensor] = field(default_factory=list)  # outputs of the chunks run so far

    def finish(self, result: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


class StepCombiner:
    def __init__(
        self,
        run_batch: Callable[[list[Step]], None],
        *,
        expected: Callable[[], int] = lambda: 1,
        gather_s: float = 0.0,
    ) -> None:
        self._run_batch = run_batch  # finishes (result or error) the steps it completes, advances others
        self._expected = expected  # how many steps a full batch would hold (open sessions)
        self._gather_s = gather_s
        self._cond = threading.Condition()
        self._queue: list[Step] = []
        self._running = False
        self._ring: dict[int, int] = {}  # open slots this stage drives round a pipeline: its stages

    def opened(self, slot: int, ring: int) -> None:
        """This stage drives the session in `slot` round a pipeline of `ring` stages (see `_limit`)."""
        with self._cond:
            if ring > 1:
                self._ring[slot] = ring

    def closed(self, slot: int) -> None:
        with self._cond:
            self._ring.pop(slot, None)

    def submit(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """Runs `steps` (together with whatever else is queued) and returns their results in order."""
        with self._cond:
            self._queue.extend(steps)
            self._cond.notify_all()  # a leader may be gathering
            while not all(s.done for s in steps):
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._gather()
                limit = self._limit(len(self._queue))
                batch, self._queue = self._queue[:limit], self._queue[limit:]
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._queue[:0] = [s for s in batch if not s.done]  # unfinished prompts go first
                    self._running = False
                    self._cond.notify_all()
        for s in steps:
            if s.error is not None:
                raise s.error
        return [s.result for s in steps]  # type: ignore[misc]

    def run_now(self, steps: Sequence[Step]) -> bool:
        """Runs `steps` as one batch on the calling thread, without gathering, when no batch is running
        or queued; otherwise runs nothing and returns False. For a caller that gathers its own steps
        (the stage's event loop, dataplane/stage_batcher.py) and must not wait behind a prompt chunk."""
        with self._cond:
            if self._running or self._queue:
                return False
            self._running = True
        try:
            while not all(s.done for s in steps):  # a prompt runs chunk by chunk
                self._run([s for s in steps if not s.done])
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
        return True

    def cap(self) -> int:
        """The most steps one batch takes: 1/R of the open sessions when this stage drives them round
        R stages (the smallest R among them), else no limit."""
        with self._cond:
            return self._limit(1 << 30)

    def _limit(self, queued: int) -> int:
        """Steps one batch takes of `queued`: all, or 1/R of the open sessions when this stage drives
        them round R stages. R is the smallest ring among them: a chain is a client's to name, and one
        session on a 64-hop chain must not cut every other session's batches to one step."""
        if not self._ring:
            return queued
        return min(queued, max(1, -(-self._expected() // min(self._ring.values()))))

    def _gather(self) -> None:
        """Leader, holding the lock: wait briefly for the other open sessions' steps. (Waiting only for
        a driving stage's micro-batch, not the group a stage away, measured slower: 54.8 against
        62.6 tok/s, docs/benchmarks.md.)"""
        if self._gather_s <= 0:
            return
        deadline = time.monotonic() + self._gather_s
        while len(self._queue) < self._expected():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _run(self, batch: list[Step]) -> None:
        try:
            self._run_batch(batch)
        except BaseException as e:  # noqa: BLE001 - hand the failure to every waiter, not only the leader
            for s in batch:
                if not s.done:
                    s.finish(error=e)
