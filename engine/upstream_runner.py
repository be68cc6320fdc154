"""UpstreamRunner: an EngineRunner whose engine is an upstream server, awaited on the event loop.

Admission is the runner's own (a bounded queue per model, 429 beyond it); the slots are the upstream's
concurrency limit, one semaphore shared by all models of that upstream. The load it reports is the
larger of its own count and the upstream's signals (running, waiting, KV usage, a cold Ollama model),
so other nodes rank this holder by what the upstream really carries, other clients' requests included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from core.types import Chunk, GenerationRequest
from engine.runner import EngineRunner, LoadFigures
from engine.upstream import UpstreamEngine

KV_FULL = 0.95  # KV usage above this: the upstream queues what comes next


class UpstreamRunner(EngineRunner):
    def __init__(self, engine: UpstreamEngine, *, slots: asyncio.Semaphore, parallel: int, max_queue: int,
                 on_load_change: Callable[[], None] | None = None) -> None:
        super().__init__(engine, parallel=parallel, max_queue=max_queue, on_load_change=on_load_change)
        self._slots = slots  # the upstream's limit, shared by its models
        self.upstream = engine

    @property
    def inflight(self) -> int:
        """This node's requests at the upstream now, admitted or queued."""
        return self._active + self._queued

    @property
    def load(self) -> LoadFigures:
        return combined_load(super().load, self.upstream.signals.running, self.upstream.signals.waiting,
                             self.upstream.signals.kv_usage, self.upstream.served_name in self.upstream.signals.cold,
                             self.parallel)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        chunks = self.upstream.astream(request)  # what it refuses, it refuses before the queue
        async with self.admit():
            started = time.monotonic()
            n_tokens = 0
            try:
                async for chunk in chunks:
                    n_tokens += len(chunk.token_ids) or (1 if chunk.text else 0)
                    yield chunk
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            elapsed = time.monotonic() - started
            if n_tokens >= 8 and elapsed > 0:
                rate = n_tokens / elapsed
                ema = self._tokens_per_s_ema
                self._tokens_per_s_ema = rate if ema == 0 else 0.8 * ema + 0.2 * rate

    async def run(self, fn: Callable[[], Any]) -> Any:
        self.upstream.bind(asyncio.get_running_loop())
        return await super().run(fn)


def combined_load(own: LoadFigures, running: int | None, waiting: int | None, kv_usage: float | None,
                  cold: bool, parallel: int) -> LoadFigures:
    """Pure: our own figures, raised to what the upstream reports. A nearly full KV cache counts as all
    slots busy; a model that must be loaded first (Ollama) as one queued."""
    active = max(own.active, running or 0)
    queued = max(own.queued, waiting or 0)
    if kv_usage is not None and kv_usage >= KV_FULL:
        active = max(active, parallel)
    if cold:
        queued += 1
    return LoadFigures(active, queued, own.capacity)
