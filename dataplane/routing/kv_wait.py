"""Waiting out a pipeline stage whose KV pool is spent (pure; clock passed in).

A stage whose paged KV pool is spent by other sessions answers `Busy` (RESOURCE_EXHAUSTED with
retry-after; `dataplane/stage.py`). It is healthy, only full: it is not blamed or avoided. The stream
has ended, so every stage of the chain gave its blocks back; the gateway waits (`decide`), then
replays the prompt and the ids sent so far on a chain through the failover path (`resume.py`), as a
whole-model stream steps aside and recomputes (`engine/torch_generate.py`). A prompt whose chain
has no room before its first token waits the same way (`Router._when_room`). Each wait doubles, at
least the stage's retry-after, at most `MAX_DELAY_S`, spread by +-`JITTER` so that streams that met
the same full pool together do not all replay in the same instant and fill it again; a stream that
found no room for `BUDGET_S` ends with the stage's Busy, as it did before waiting was tried.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET_S = 60.0  # the longest a stream waits for room, from its first Busy until a replay's first token
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 4.0
JITTER = 0.25  # a wait is its backoff times 1 +- this (never under the stage's retry-after)
MAX_WAITING = 32  # streams of one model a gateway lets wait at once; past that, Busy (429) at once


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep `delay_s`, then replay on a chain."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Waited long enough: the stream ends with the stage's error."""

    waited_s: float


def decide(retry_after_s: float, since: float, now: float, attempts: int,
           budget_s: float = BUDGET_S, draw: float = 0.5) -> Wait | GiveUp:
    """After the `attempts`-th replay found the pool spent (0: the stream itself did), waiting since
    `since`: how long to wait before the next replay, or give up when that wait would end past the
    budget. `draw` in [0, 1) spreads the backoff (the caller passes a random number; 0.5 is none)."""
    waited_s = max(0.0, now - since)
    backoff_s = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** max(0, attempts)) * (1.0 + JITTER * (2.0 * draw - 1.0))
    delay_s = max(float(retry_after_s), backoff_s)
    if waited_s + delay_s > budget_s:
        return GiveUp(waited_s)
    return Wait(delay_s)
