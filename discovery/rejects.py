"""Counting refused peer input, and logging it without letting a flood fill the log."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

MAX_REASONS = 64  # reason codes are ours, not the peer's, but cap the map anyway


class RateLimitedLogger:
    """Logs a given key at most once per interval_s; counts what it swallowed in between."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] += 1
            return False
        if key not in self._last and len(self._last) >= MAX_REASONS:
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d more since last logged)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args)
        return True


class RejectCounter:
    """Per-reason counters of refused adverts (or of what `what` names: weights), exposed via
    Discovery.rejects and /mesh/self."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0, what: str = "advert") -> None:
        self._counts: Counter[str] = Counter()
        self._log = RateLimitedLogger(logger, interval_s)
        self._what = what

    def reject(self, reason: str, source: str, detail: str = "") -> None:
        if reason in self._counts or len(self._counts) < MAX_REASONS:
            self._counts[reason] += 1
        self._log.log(logging.WARNING, reason, "rejected %s from %s: %s %s", self._what, source, reason, detail)

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]
