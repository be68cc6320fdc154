"""A stage's decode steps, batched on the event loop that receives them.

Each session's coroutine hands its one-token step to the stage's `LoopBatcher` and awaits the result.
The batcher runs the pending steps as one batch on the loop's own thread. Before, each step went to
a worker thread, and the engine's combiner gathered them there. That cost a thread hand-off each way
per step, and the compute thread fought the loop thread for the GIL. On the 2-core dev box, a
batch of 2 at the last stage took 19.4 ms of wall time against 17.0 ms of its thread's CPU when it
did not pause between batches. Measured in one window: 4 streams through 2 stages at 90-98 tok/s,
against 80-83 tok/s through threads (docs/benchmarks.md).

**Waiting for a batch.** A batch waits, asynchronously (the loop keeps reading frames), up to the
engine's gather time for its group. The group is the size of the batch the previous stage ran these
steps in: each activation frame and each reply carries it as `b` (stage_wire.py). Micro-batches thus
keep their shape round the ring. Waiting for every open session instead let the last stage wait
2 ms for a group that was a stage away: 86-91 tok/s against 94-98 (same window).

**Prompts stay off the loop.** A step with more than one position goes to a worker thread through
the engine's combiner, as before. So does any step that finds a batch already in flight there
(a prompt chunk): `run_steps(now=True)` declines rather than block the loop behind a chunk. On the
thread, the step joins the chunk's next iteration (continuous batching). The loop is thus blocked
for one decode batch at most: the step of a single session already ran inline before.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from engine.torch_engine import TorchShardEngine


@dataclass(slots=True, eq=False)
class _Pending:
    sid: str
    x: torch.Tensor
    pos: int
    group: int | None  # the size of the batch that made x at the previous stage
    future: asyncio.Future[tuple[torch.Tensor, float, int]]


class LoopBatcher:
    """The decode steps of one engine's sessions; one per engine, used from its node's event loop."""

    def __init__(self, engine: TorchShardEngine, gather_s: float) -> None:
        self.engine = engine
        self._gather_s = gather_s
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0  # decode batches run, and the steps in them: for /mesh/self and tests
        self.steps = 0

    async def step(self, sid: str, x: torch.Tensor, pos: int, group: int | None = None) -> tuple[torch.Tensor, float, int]:
        """Runs one session's one-token step with whatever else is pending: (output, compute seconds
        of its batch, steps in its batch). Raises the step's own error."""
        p = _Pending(sid, x, pos, group, asyncio.get_running_loop().create_future())
        self._pending.append(p)
        self._arrived.set()
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        try:
            return await p.future
        except asyncio.CancelledError:
            if p in self._pending:  # not run yet: it never will be
                self._pending.remove(p)
            raise

    def _want(self) -> int:
        """Steps the next batch waits for: the first pending step's group, at most the sessions open
        and the engine's cap (1/R of them where this stage drives a ring of R)."""
        cap = self.engine.step_cap()
        group = self._pending[0].group if self._pending else None
        return max(1, min(self.engine.n_sessions, cap, group or cap))

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._gather()
                cap = self.engine.step_cap()
                batch, self._pending = self._pending[:cap], self._pending[cap:]
                if batch:
                    await self._run(batch)
        finally:
            self._draining = None

    async def _gather(self) -> None:
        if len(self._pending) >= self._want():
            return
        deadline = time.monotonic() + self._gather_s
        while self._pending and len(self._pending) < self._want():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
                return

    async def _run(self, batch: list[_Pending]) -> None:
        sids, xs, positions = [p.sid for p in batch], [p.x for p in batch], [p.pos for p in batch]
        started = time.perf_counter()
        try:
            results = self.engine.run_steps(sids, xs, positions, now=True)
            if results is None:  # a prompt chunk holds the engine: join its next iteration, off the loop
                results = await asyncio.to_thread(self.engine.run_steps, sids, xs, positions)
                assert results is not None
        except Exception as e:  # noqa: BLE001 - a call-level failure fails this batch's steps, not the batcher
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        compute_s = time.perf_counter() - started
        self.batches += 1
        self.steps += len(batch)
        for p, r in zip(batch, results, strict=True):
            if p.future.done():  # its session was cancelled meanwhile
                continue
            if isinstance(r, Exception):
                p.future.set_exception(r)
            else:
                p.future.set_result((r, compute_s, len(batch)))
