"""A stage's decode steps, batched on the event loop that receives them.

Each session's coroutine hands its one-token step to the stage's `LoopBatcher` and awaits the result.
The batcher runs the pending steps as one batch on the loop's own thread. Before, each step went to
a worker thread, where the engine's combiner gathered them. That cost a thread hand-off each way per
step, and the compute thread fought the loop thread for the GIL: on the 2-core dev box the last
stage's batch of 2 took 19.4 ms of wall time against 17.0 ms of its thread's CPU whenever it did not
pause between batches. 4 streams through 2 stages: 90-99 tok/s against 79-87 through worker threads,
alternating in one window (docs/benchmarks.md).

**Waiting for a batch.** A batch waits, asynchronously (the loop keeps reading frames), up to the
engine's gather time for its group. The stage that drives a ring of R stages forms the groups (1/R of
its sessions, the engine's cap). Each activation frame and each reply carries the size of the batch
the sender ran the step in (`b`, stage_wire.py), and a later stage waits for that many, so the
micro-batches keep their shape round the ring. Waiting for every open session instead made the last
stage wait 2 ms a batch for a group that was a stage away: 86-91 tok/s against 94-98.

**What stays off the loop.** Three kinds of work run on a worker thread through the engine's
combiner, as before:
- a step with more than one position (a prompt);
- any step that finds a batch in flight there (a prompt chunk): `run_steps(now=True)` declines
  rather than block the loop behind the chunk;
- a batch that would first capture a CUDA graph (`decode_ready`): warm-ups and compiles take seconds.

On the thread, a step joins the chunk's next iteration (continuous batching). Batches that are ready
run back to back for up to `yield_after_s` (50 ms) before the loop serves anything else. Yielding
after every batch measured 3.5 % slower (92.5 against 95.9 tok/s, means of 8 runs, alternating): a
batch's outputs do not leave in one loop turn anyway. A later stage runs each group on its own even
when two arrive together, so the ring keeps its micro-batches. A single session's step already ran
inline before.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass

import torch

from core.errors import Unavailable
from engine.session_errors import SessionError
from engine.torch_engine import TorchShardEngine


@dataclass(slots=True, eq=False)
class _Pending:
    sid: str
    x: torch.Tensor
    pos: int
    group: int | None  # the size of the batch that made x at the previous stage
    future: asyncio.Future[tuple[torch.Tensor, float, int]]


class LoopBatcher:
    """The decode steps of one engine's sessions; one per engine, used from its node's event loop.
    It holds the engine weakly: an unloaded range's engine must be free to go (its memory is
    handed back to the node's budget)."""

    def __init__(self, engine: TorchShardEngine, gather_s: float, yield_after_s: float = 0.05) -> None:
        self._engine = weakref.ref(engine)
        self._gather_s = gather_s
        self._yield_after_s = yield_after_s  # the longest run of batches before the loop serves others
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0  # decode batches run, and the steps in them (tests read them)
        self.steps = 0

    @property
    def engine(self) -> TorchShardEngine:
        engine = self._engine()
        if engine is None:
            raise SessionError("the engine was unloaded")
        return engine

    async def step(self, sid: str, x: torch.Tensor, pos: int, group: int | None = None) -> tuple[torch.Tensor, float, int]:
        """Runs one session's one-token step with whatever else is pending: (output, compute seconds
        of its batch, steps in its batch). Raises the step's own error."""
        p = _Pending(sid, x, pos, group, asyncio.get_running_loop().create_future())
        self._pending.append(p)
        self._arrived.set()
        if self._draining is None:
            if len(self._pending) == 1 and self._want() <= 1:  # nothing to batch with: now, in this task
                self._pending.clear()
                await self._run([p])
            else:
                self._draining = asyncio.create_task(self._drain())
        try:
            return await p.future
        except asyncio.CancelledError:
            if p in self._pending:  # not run yet: it never will be
                self._pending.remove(p)
            raise

    def _want(self) -> int:
        """Steps the next batch waits for, and takes at most. The stage that drives sessions round a
        ring of R stages forms the groups: 1/R of its open sessions (the engine's cap), whatever came
        back, so that a group split by a timeout merges again. A later stage keeps the group it is
        sent (the first pending step's), or waits for every open session when it is not told (a
        prompt's first decode step, an older peer)."""
        engine = self.engine
        n, cap = engine.n_sessions, engine.step_cap()
        if cap < n:
            return max(1, cap)
        group = self._pending[0].group if self._pending else None
        return max(1, min(n, group or n))

    async def _drain(self) -> None:
        since = time.monotonic()
        try:
            while self._pending:
                await self._gather()
                if not self._pending:  # the steps waited for were cancelled
                    break
                want = self._want()
                batch, self._pending = self._pending[:want], self._pending[want:]
                await self._run(batch)
                if time.monotonic() - since > self._yield_after_s:  # others' turn on the loop
                    await asyncio.sleep(0)
                    since = time.monotonic()
        except BaseException as e:  # the drain itself failed (a cancel at shutdown): no step may hang
            pending, self._pending = self._pending, []
            if not _fail(pending, e):
                raise
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
            engine = self.engine
            # On the loop unless a graph must be captured first, or a prompt chunk holds the engine:
            # then off the loop, joining the chunk's next iteration (continuous batching).
            results = engine.run_steps(sids, xs, positions, now=True) if engine.decode_ready(len(batch)) else None
            if results is None:
                results = await asyncio.to_thread(engine.run_steps, sids, xs, positions)
                assert results is not None
        except BaseException as e:  # a call-level failure fails this batch's steps, not the batcher
            if not _fail(batch, e):
                raise
            return
        compute_s = time.perf_counter() - started
        self.batches += 1
        self.steps += len(batch)
        for p, r in zip(batch, results, strict=True):
            if p.future.done():  # its session was cancelled meanwhile
                continue
            if isinstance(r, Exception):
                _fail([p], r)
            else:
                p.future.set_result((r, compute_s, len(batch)))


def _fail(steps: list[_Pending], e: BaseException) -> bool:
    """Fails the steps not yet answered with `e`; False when `e` is not an error of the steps (a
    cancel, an exit), which they get as Unavailable and the caller re-raises."""
    ours = isinstance(e, Exception)
    # a future refuses StopIteration (it would end the awaiting coroutine)
    err = (e if not isinstance(e, StopIteration) else RuntimeError(repr(e))) if ours else Unavailable("the stage stopped")
    for p in steps:
        if not p.future.done():
            p.future.set_exception(err)
    return ours
