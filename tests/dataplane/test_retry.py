"""Table-driven tests of the one retry policy (generate and embed) and the failure book."""

from __future__ import annotations

import pytest

from core.errors import BadRequest, Busy, ContextTooLong, Internal, Refused, Unavailable
from dataplane.routing.retry import (
    FAILURE_MEMORY_S,
    MAX_ATTEMPTS,
    Attempts,
    GiveUp,
    NoHolder,
    TryHolder,
    after_error,
    next_try,
    record_failure,
)
from placement.choose_holder import FailureRecord

NEXT = [
    # (name, ranked, saturated, attempts, expected decision)
    ("best first", ["a", "b"], False, Attempts(), TryHolder("a")),
    ("excluded skipped", ["a", "b"], False, Attempts(exclude={"a"}, tried=1), TryHolder("b")),
    ("nobody holds it whole: pipeline", [], False, Attempts(), NoHolder()),
    ("all full at once: busy", [], True, Attempts(), GiveUp(Busy(1))),
    ("all tried: busy with their retry-after", ["a"], False, Attempts(exclude={"a"}, tried=1, retry_after_s=4),
     GiveUp(Busy(4))),
    ("attempts spent", ["d"], False, Attempts(exclude={"a", "b", "c"}, tried=MAX_ATTEMPTS), GiveUp(Busy(1))),
    ("every try failed: unavailable", ["a"], False, Attempts(exclude={"a"}, tried=1, failed=["a: down"]),
     GiveUp(Unavailable("every holder tried failed: a: down"))),
    ("a resumed stream does not fall back to a pipeline", [], False, Attempts(exclude={"a"}, tried=1),
     GiveUp(Busy(1))),
]


def _same(a: object, b: object) -> bool:
    if isinstance(a, GiveUp) and isinstance(b, GiveUp):
        return type(a.error) is type(b.error) and str(a.error) == str(b.error)
    return a == b


@pytest.mark.parametrize(("name", "ranked", "saturated", "attempts", "expected"), NEXT, ids=[c[0] for c in NEXT])
def test_next_try(name, ranked, saturated, attempts, expected):
    assert _same(next_try(ranked, saturated, attempts), expected)


AFTER = [
    # (name, error, node failed?, retry_after_s afterwards)
    ("unreachable holder failed", Unavailable("UNAVAILABLE: gone"), True, 1),
    ("busy holder skipped with its retry-after", Busy(7), False, 7),
    ("refusing holder skipped", Refused("precondition"), False, 1),
]


@pytest.mark.parametrize(("name", "error", "failed", "retry_after"), AFTER, ids=[c[0] for c in AFTER])
def test_after_error_books_the_try(name, error, failed, retry_after):
    attempts = Attempts()
    assert after_error(attempts, "node-a-long-id", error) is failed
    assert attempts.tried == 1 and attempts.exclude == {"node-a-long-id"}
    assert attempts.retry_after_s == retry_after
    assert attempts.failed == (["node-a-l: UNAVAILABLE: gone"] if failed else [])


@pytest.mark.parametrize("error", [BadRequest("no"), ContextTooLong("too long"), Internal("boom")])
def test_final_errors_are_raised(error):
    with pytest.raises(type(error)):
        after_error(Attempts(), "a", error)


FAILURES = [
    # (name, old record, now, expected)
    ("first failure", None, 100.0, FailureRecord(1, 100.0)),
    ("again soon: counted up", FailureRecord(2, 90.0), 100.0, FailureRecord(3, 100.0)),
    ("long after: starts over", FailureRecord(5, 0.0), FAILURE_MEMORY_S + 1, FailureRecord(1, FAILURE_MEMORY_S + 1)),
]


@pytest.mark.parametrize(("name", "old", "now", "expected"), FAILURES, ids=[c[0] for c in FAILURES])
def test_record_failure(name, old, now, expected):
    assert record_failure(old, now) == expected
