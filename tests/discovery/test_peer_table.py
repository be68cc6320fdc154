"""Table-driven PeerTable tests with a fake clock: each case is a list of steps and expected results."""

from __future__ import annotations

import pytest
from disc_builders import make_advert

from discovery.identity import Identity
from discovery.peer_table import ApplyResult, PeerTable, freshness_error

A, B, C, D, ME = (Identity.generate() for _ in range(5))
R = ApplyResult

# step: ("apply", identity, seq, now, expected) | ("goodbye", identity, expected_bool)
#     | ("expire", now, [identities dropped]) | ("live", now, [identities in snapshot])
CASES = {
    "new": [("apply", A, 1, 0.0, R.NEW), ("live", 0.0, [A])],
    "newer seq updates": [("apply", A, 1, 0.0, R.NEW), ("apply", A, 2, 1.0, R.UPDATED), ("live", 1.0, [A])],
    "older seq is a replay": [("apply", A, 5, 0.0, R.NEW), ("apply", A, 4, 1.0, R.STALE)],
    "equal seq refreshes last_seen": [
        ("apply", A, 1, 0.0, R.NEW),
        ("apply", A, 1, 8.0, R.REFRESHED),
        ("expire", 15.0, []),
        ("live", 18.0, [A]),
        ("expire", 18.01, [A]),
    ],
    "expiry exactly at ttl keeps, just after drops": [
        ("apply", A, 1, 0.0, R.NEW),
        ("expire", 10.0, []),
        ("live", 10.0, [A]),
        ("live", 10.001, []),
        ("expire", 10.001, [A]),
        ("live", 10.001, []),
    ],
    "expired peer cannot be resurrected by a replay": [
        ("apply", A, 3, 0.0, R.NEW),
        ("expire", 11.0, [A]),
        ("apply", A, 3, 12.0, R.STALE),
        ("apply", A, 4, 12.0, R.NEW),
    ],
    "goodbye drops at once and blocks the same seq": [
        ("apply", A, 7, 0.0, R.NEW),
        ("goodbye", A, True),
        ("live", 0.0, []),
        ("apply", A, 7, 1.0, R.STALE),
        ("apply", A, 8, 1.0, R.NEW),
        ("goodbye", B, False),
    ],
    "self is ignored": [("apply", ME, 1, 0.0, R.SELF), ("live", 0.0, [])],
    "full table refuses new nodes, not updates": [
        ("apply", A, 1, 0.0, R.NEW),
        ("apply", B, 1, 0.0, R.NEW),
        ("apply", C, 1, 0.0, R.NEW),
        ("apply", D, 1, 0.0, R.FULL),
        ("apply", A, 2, 0.0, R.UPDATED),
        ("goodbye", B, True),
        ("apply", D, 1, 0.0, R.NEW),
    ],
    "snapshot sorted by node id": [
        ("apply", C, 1, 0.0, R.NEW),
        ("apply", A, 1, 0.0, R.NEW),
        ("apply", B, 1, 0.0, R.NEW),
        ("live", 1.0, sorted([A, B, C], key=lambda i: i.node_id)),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_peer_table(steps: list[tuple]) -> None:
    table = PeerTable(ME.node_id, max_peers=3)
    for step in steps:
        kind = step[0]
        if kind == "apply":
            _, ident, seq, now, expected = step
            assert table.apply(make_advert(ident, seq=seq, ttl_s=10.0), now, "mdns") is expected, step
        elif kind == "goodbye":
            assert table.goodbye(step[1].node_id) is step[2], step
        elif kind == "expire":
            assert table.expire(step[1]) == [i.node_id for i in step[2]], step
        elif kind == "live":
            assert [p.advert.node_id for p in table.snapshot(step[1])] == [i.node_id for i in step[2]], step


def test_refresh_keeps_source_and_reports_age() -> None:
    table = PeerTable(ME.node_id)
    table.apply(make_advert(A), 0.0, "libp2p")
    table.apply(make_advert(A), 2.5, "")
    peer = table.get(A.node_id)
    assert peer is not None and peer.source == "libp2p" and peer.last_seen_s(4.0) == 1.5
    assert len(table) == 1


def test_many_refreshes_keep_heap_bounded() -> None:
    table = PeerTable(ME.node_id)
    ids = [Identity.generate() for _ in range(20)]
    adverts = [make_advert(i) for i in ids]
    for t in range(500):
        for a in adverts:
            table.apply(a, float(t), "mdns")
    assert len(table._deadlines) <= 4 * len(table) + 64
    assert table.expire(499.0 + 10.0) == []
    assert sorted(table.expire(510.0)) == sorted(i.node_id for i in ids)


@pytest.mark.parametrize(
    ("issued_at", "now", "expected"),
    [(1000.0, 1000.0, None), (700.0, 1000.0, None), (699.0, 1000.0, "stale"), (1301.0, 1000.0, "future")],
)
def test_freshness(issued_at: float, now: float, expected: str | None) -> None:
    assert freshness_error(make_advert(A, issued_at=issued_at), now, max_skew_s=300.0) == expected
