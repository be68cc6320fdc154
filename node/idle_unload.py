"""Which layer ranges loaded for the mesh to unload, because they have served nothing for a while.

Any member can make an offering node load a range (`LoadShard`, gated by `dataplane/load_gate.py`);
without this, the memory stays taken until the process ends (issue 11, finding 15). A range is
unloaded when it was loaded on request (never what the user started the node with), has no session
open or queued, and was last used `idle_s` or more ago. The decision is pure, the clock passed in;
`Usage` keeps the last-use times the daemon feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_IDLE_S = 600.0
DEFAULT_CHECK_S = 60.0


@dataclass(frozen=True, slots=True)
class RangeUse:
    digest: str
    on_request: bool  # loaded by LoadShard; False for --model/--shard ranges, which are never unloaded
    last_used_s: float  # monotonic seconds of the last step, request or load
    open_sessions: int  # requests and stage sessions admitted or queued by its runner

    def __post_init__(self) -> None:
        if self.open_sessions < 0:
            raise ValueError("open_sessions must be >= 0")


def idle_ranges(uses: Iterable[RangeUse], now_s: float, idle_s: float) -> list[str]:
    """The digests to unload now, in the order given."""
    if idle_s <= 0:
        raise ValueError("idle_s must be > 0")
    return [u.digest for u in uses if u.on_request and u.open_sessions == 0 and now_s - u.last_used_s >= idle_s]


@dataclass(slots=True)
class Usage:
    """Last use per loaded digest. Keys are our own loaded models (a handful), never peer input."""

    _last_s: dict[str, float] = field(default_factory=dict)
    _busy: frozenset[str] = frozenset()

    def touch(self, digest: str, now_s: float) -> None:
        self._last_s[digest] = max(now_s, self._last_s.get(digest, now_s))

    def observe(self, busy: Iterable[str], now_s: float) -> None:
        """`busy`: the digests with requests or sessions open now (called whenever a runner's load
        changes). Each is in use now, and so is one busy at the last call: its request just ended."""
        now_busy = frozenset(busy)
        for digest in now_busy | self._busy:
            self.touch(digest, now_s)
        self._busy = now_busy

    def last_s(self, digest: str, default_s: float) -> float:
        return self._last_s.get(digest, default_s)

    def forget(self, digest: str) -> None:
        self._last_s.pop(digest, None)
        self._busy = self._busy - {digest}
