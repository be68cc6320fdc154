"""EngineRunner: the asyncio face of a blocking engine, with a bounded queue per model.

Generation runs on the runner's own worker threads; chunks hop back onto the event loop through
`call_soon_threadsafe`. Admission is decided up front (active + queued < capacity, else QueueFull),
so an overloaded node answers 429 at once instead of letting requests pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from core.errors import Busy
from engine.base import Engine
from engine.types import Chunk, GenerationRequest


class QueueFull(Busy):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(retry_after_s, f"queue full; retry after {retry_after_s} s")


@dataclass(frozen=True, slots=True)
class LoadFigures:
    active: int
    queued: int
    capacity: int


_END = object()
RETRY_AFTER_MAX_S = 60


def retry_after_s(queued: int, parallel: int, mean_service_s: float) -> int:
    """Seconds until a slot is likely free: the queue ahead drains `parallel` requests per mean
    service time, and this one needs a slot too. At least 1, at most RETRY_AFTER_MAX_S."""
    wait_s = (queued / parallel + 1) * mean_service_s
    return max(1, min(RETRY_AFTER_MAX_S, math.ceil(wait_s)))


class EngineRunner:
    def __init__(
        self,
        engine: Engine,
        *,
        parallel: int = 1,
        max_queue: int = 16,
        on_load_change: Callable[[], None] | None = None,
    ) -> None:
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.parallel = parallel
        self.capacity = parallel + max_queue
        self._slots = asyncio.Semaphore(parallel)
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="engine")
        self._active = 0
        self._queued = 0
        self._on_load_change = on_load_change or (lambda: None)
        self._tokens_per_s_ema = 0.0
        self._service_s_ema = 0.0  # how long a request holds a slot, smoothed over recent ones

    @property
    def load(self) -> LoadFigures:
        return LoadFigures(self._active, self._queued, self.capacity)

    def current_retry_after_s(self) -> int:
        """What a 429 from this runner would say now (the router's answer when it finds it full)."""
        return retry_after_s(self._queued, self.parallel, self._service_s_ema)

    @property
    def tokens_per_s(self) -> float:
        """Smoothed decode speed observed on real requests (0 until the first one)."""
        return self._tokens_per_s_ema

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """One slot for the whole of a request: raises QueueFull when `capacity` requests are already
        active or queued, else waits for one of the `parallel` slots. Generations and embeddings here,
        and the sessions of pipeline stages on this model, are all admitted through it."""
        if self._active + self._queued >= self.capacity:
            raise QueueFull(retry_after_s(self._queued, self.parallel, self._service_s_ema))
        self._queued += 1
        self._on_load_change()
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        self._active += 1
        self._on_load_change()
        started = time.monotonic()
        try:
            yield
        finally:
            held_s = time.monotonic() - started
            ema = self._service_s_ema
            self._service_s_ema = held_s if ema == 0 else 0.8 * ema + 0.2 * held_s
            self._active -= 1
            self._slots.release()
            self._on_load_change()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yields the engine's chunks. Closing the iterator early (client gone) cancels generation."""
        loop = asyncio.get_running_loop()
        async with self.admit():
            cancel = threading.Event()
            queue: asyncio.Queue[Any] = asyncio.Queue()

            def produce() -> None:
                try:
                    for chunk in self.engine.generate(request, cancel):
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
                        if cancel.is_set():
                            break
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, _END)

            started = loop.time()
            n_tokens = 0
            future = loop.run_in_executor(self._executor, produce)
            try:
                while (item := await queue.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    n_tokens += len(item.token_ids)
                    yield item
            finally:
                cancel.set()
                # The slot is released only once the worker thread has really stopped.
                await asyncio.shield(future)
                elapsed = loop.time() - started
                if n_tokens >= 8 and elapsed > 0:
                    rate = n_tokens / elapsed
                    ema = self._tokens_per_s_ema
                    self._tokens_per_s_ema = rate if ema == 0 else 0.8 * ema + 0.2 * rate

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Runs a blocking engine call (embeddings, token counts) in a slot."""
        loop = asyncio.get_running_loop()
        async with self.admit():
            return await loop.run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
