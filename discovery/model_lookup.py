"""Records mode: looking a model's holders up in the DHT, bounded (pure but for the host call).

A lookup is a Kademlia walk plus up to MAX_RESULTS value fetches and dials, and the router asks for one
for any model name a client sends: so at most one lookup per name per LOOKUP_EVERY_S, and at most
MAX_LOOKUPS_PER_MINUTE in all (a client naming random models must not turn the node into a DHT
scanner). The name is a model's alias or digest: holders provide a key for each (`model_keys`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from discovery.model_records import record_key

LOOKUP_EVERY_S = 2.0  # one walk per name in this long: the first one's answers are still arriving
MAX_LOOKUPS_PER_MINUTE = 30
MAX_NAME_CHARS = 128  # a model alias is at most 64 characters, a digest 64
MAX_TRACKED_NAMES = 256


class ModelLookups:
    """Decides whether a lookup goes out now (`allow`, pure, clock passed in) and sends it (`lookup`)."""

    def __init__(self, send: Callable[[str], None] | None = None) -> None:
        self.send = send  # Libp2pHost.lookup(record key); None until the host runs (or outside records mode)
        self._last: dict[str, float] = {}  # name -> when it was last looked up
        self._recent: deque[float] = deque()  # times of the lookups of the last minute
        self.sent = 0
        self.refused = 0

    def allow(self, name: str, now: float) -> bool:
        if not name or len(name) > MAX_NAME_CHARS:
            return False
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        if len(self._recent) >= MAX_LOOKUPS_PER_MINUTE or now - self._last.get(name, float("-inf")) < LOOKUP_EVERY_S:
            return False
        if name not in self._last and len(self._last) >= MAX_TRACKED_NAMES:
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
        self._last[name] = now
        self._recent.append(now)
        return True

    def lookup(self, name: str, now: float) -> bool:
        """Looks `name` up unless throttled or no host runs; True when the lookup went out."""
        if self.send is None or not self.allow(name, now):
            self.refused += 1
            return False
        self.send(record_key(name))
        self.sent += 1
        return True
