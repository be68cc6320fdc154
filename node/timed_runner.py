"""An EngineRunner that times how long each admitted request waited for a slot (queue wait)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import Histogram

from engine.runner import EngineRunner

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def queue_wait_histogram() -> Histogram:
    """Not registered anywhere yet: the node registers it in its own registry (node/observability.py)."""
    return Histogram("meshllm_queue_wait_seconds",
                     "Time a request (generation, embedding or pipeline stage session) waited for an engine slot.",
                     ["model"], buckets=WAIT_BUCKETS, registry=None)


class TimedRunner(EngineRunner):
    def __init__(self, *args: object, waits: Histogram, model: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._waits = waits.labels(model)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """The runner's admission (QueueFull at once when full), timing the wait for a slot."""
        asked = time.perf_counter()
        async with super().admit():
            self._waits.observe(time.perf_counter() - asked)
            yield
