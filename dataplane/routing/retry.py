"""The one retry policy of generate and embed, and the failure book (pure; clock passed in).

A request tries at most `MAX_ATTEMPTS` whole-model holders, best first. A holder that could not be
reached or broke off (`Unavailable`) is recorded as failed by node id and backed off by later
rankings; a busy or refusing one is skipped; a bad request is final. When no holder is left the
request fails with 502 if every try failed, else it is busy (429).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from core.errors import Busy, MeshError, Refused, Unavailable
from placement.choose_holder import FailureRecord

MAX_ATTEMPTS = 3
FAILURE_MEMORY_S = 120.0


def record_failure(old: FailureRecord | None, now: float) -> FailureRecord:
    """A node's failure count grows while failures come within FAILURE_MEMORY_S of each other."""
    count = old.count + 1 if old is not None and now - old.last_at < FAILURE_MEMORY_S else 1
    return FailureRecord(count, now)


@dataclass(slots=True)
class Attempts:
    """One request's tries so far. `exclude` outlives a generation: a resumed stream skips them too."""

    exclude: set[str] = field(default_factory=set)
    tried: int = 0
    failed: list[str] = field(default_factory=list)
    retry_after_s: int = 1


@dataclass(frozen=True, slots=True)
class TryHolder:
    node_id: str


@dataclass(frozen=True, slots=True)
class NoHolder:
    """Nobody holds the model whole: a generation goes to a pipeline; an embedding is not found."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    error: MeshError


Decision = TryHolder | NoHolder | GiveUp


def next_try(ranked: Sequence[str], saturated: bool, attempts: Attempts, max_attempts: int = MAX_ATTEMPTS) -> Decision:
    """What to do next, given the current ranking (node ids, best first) and whether some holder is full."""
    candidates = [n for n in ranked if n not in attempts.exclude]
    if attempts.tried >= max_attempts:
        return GiveUp(give_up_error(attempts))
    if not candidates and not saturated and attempts.tried == 0:
        return NoHolder()
    if not candidates:
        return GiveUp(give_up_error(attempts))
    return TryHolder(candidates[0])


def after_error(attempts: Attempts, node_id: str, error: MeshError) -> bool:
    """Books a failed try; returns whether the node failed (to back it off). Raises what is final."""
    attempts.tried += 1
    attempts.exclude.add(node_id)
    if isinstance(error, Unavailable):
        attempts.failed.append(f"{node_id[:8]}: {error}")
        return True
    if isinstance(error, Busy):
        attempts.retry_after_s = error.retry_after_s
        return False
    if isinstance(error, Refused):
        attempts.retry_after_s = 1
        return False
    raise error  # a bad request, or a broken node that would break again


def give_up_error(attempts: Attempts) -> MeshError:
    if attempts.failed and len(attempts.failed) == attempts.tried:
        return Unavailable("every holder tried failed: " + "; ".join(attempts.failed))
    return Busy(attempts.retry_after_s)
