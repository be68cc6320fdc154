"""Who may make this node load layers, and how often (issue 11, finding 15).

`LoadShard` lets any member make an offering node load a range of a GGUF: seconds of disk and CPU,
and memory until the process ends. The gate serialises loads, lets a peer (its host) start at most
`per_peer` loads per `window_s`, and caps how many distinct ranges peers can make this node load at
all. Asking again for a range already loaded is free (placement retries are idempotent). A range
the node unloads again (idle, `node/idle_unload.py`) leaves the count, so the cap bounds what is held
at once; the per-peer window still bounds how often a peer can make the node load.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from core.errors import Busy, Refused

MAX_PEERS_TRACKED = 1024


@dataclass(slots=True)
class LoadGate:
    per_peer: int = 4
    window_s: float = 600.0
    max_ranges: int = 4
    clock: Callable[[], float] = time.monotonic
    _history: dict[str, deque[float]] = field(default_factory=dict)
    _loaded: set[tuple[str, int, int]] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def check(self, peer: str, key: tuple[str, int, int]) -> None:
        """Raises Busy (this peer asked too often) or Refused (enough ranges loaded for peers)."""
        if key in self._loaded:
            return
        now = self.clock()
        history = self._history.get(peer, deque())
        while history and history[0] <= now - self.window_s:
            history.popleft()
        if len(history) >= self.per_peer:
            raise Busy(max(1, int(history[0] + self.window_s - now)), "this peer asked for too many loads; retry later")
        if len(self._loaded) >= self.max_ranges:
            raise Refused(f"this node already loaded {self.max_ranges} ranges for the mesh")
        if peer not in self._history and len(self._history) >= MAX_PEERS_TRACKED:
            self._history.pop(next(iter(self._history)))
        history.append(now)
        self._history[peer] = history

    def unloaded(self, digest: str, start: int, end: int) -> None:
        """The node dropped this range: it no longer counts towards `max_ranges`."""
        self._loaded.discard((digest, start, end))

    @asynccontextmanager
    async def admit(self, peer: str, digest: str, start: int, end: int) -> AsyncIterator[None]:
        key = (digest, start, end)
        self.check(peer, key)
        async with self._lock:  # one load at a time
            yield
            self._loaded.add(key)
