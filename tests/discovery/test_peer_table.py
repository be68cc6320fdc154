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


# --- caps (issue 11, finding 5): a flood of fake members must not lock a real node out -------------

def _at(ident: Identity, host: str, seq: int = 1, ttl_s: float = 10.0):
    from discovery.advert import Addresses

    return make_advert(ident, seq=seq, ttl_s=ttl_s, addresses=Addresses(f"{host}:8600", f"{host}:9000", ()))


# step: (node, host, verified, now, expected result); the table holds 3 peers, 2 per host
CAP_CASES = {
    "per-host cap": [(A, "10.0.0.9", True, 0.0, R.NEW), (B, "10.0.0.9", True, 0.0, R.NEW),
                     (C, "10.0.0.9", True, 0.0, R.HOST_FULL), (C, "10.0.0.7", True, 0.0, R.NEW)],
    "verified newcomer evicts the least recently heard unverified entry": [
        (A, "10.0.0.1", False, 0.0, R.NEW), (B, "10.0.0.2", False, 1.0, R.NEW),
        (C, "10.0.0.3", True, 0.0, R.NEW), (D, "10.0.0.4", True, 2.0, R.NEW)],
    "unverified newcomer cannot evict": [
        (A, "10.0.0.1", False, 0.0, R.NEW), (B, "10.0.0.2", False, 0.0, R.NEW),
        (C, "10.0.0.3", False, 0.0, R.NEW), (D, "10.0.0.4", False, 1.0, R.FULL)],
    "verified entries are never evicted": [
        (A, "10.0.0.1", True, 0.0, R.NEW), (B, "10.0.0.2", True, 0.0, R.NEW),
        (C, "10.0.0.3", True, 0.0, R.NEW), (D, "10.0.0.4", True, 1.0, R.FULL)],
    "expired entries make room for anyone": [
        (A, "10.0.0.1", True, 0.0, R.NEW), (B, "10.0.0.2", True, 0.0, R.NEW),
        (C, "10.0.0.3", True, 0.0, R.NEW), (D, "10.0.0.4", False, 11.0, R.NEW)],
}
EVICTED = {"verified newcomer evicts the least recently heard unverified entry": [A],
           "expired entries make room for anyone": [A, B, C]}


@pytest.mark.parametrize("name", CAP_CASES)
def test_peer_table_caps(name: str) -> None:
    table = PeerTable(ME.node_id, max_peers=3, max_per_host=2)
    for ident, host, verified, now, expected in CAP_CASES[name]:
        assert table.apply(_at(ident, host), now, "mdns", verified=verified) is expected, (ident.node_id, host)
    assert sorted(table.take_evicted()) == sorted(i.node_id for i in EVICTED.get(name, []))
    assert table.take_evicted() == []


def test_ttl_is_capped() -> None:
    table = PeerTable(ME.node_id, max_ttl_s=60.0)
    table.apply(_at(A, "10.0.0.1", ttl_s=120.0), 0.0, "mdns")
    assert [p.advert.node_id for p in table.snapshot(60.0)] == [A.node_id]
    assert table.snapshot(60.5) == [] and table.expire(60.5) == [A.node_id]


def test_a_real_node_is_listed_after_4096_fake_members() -> None:
    """The finding: 4,096 fake members filled the table and a real node joining later was never listed.
    Fakes from one machine stop at the per-host cap; fakes claiming other hosts are unverified."""
    table = PeerTable(ME.node_id)
    one_host = [table.apply(_at(Identity.generate(), "10.6.6.6"), 0.0, "mdns", verified=True) for _ in range(100)]
    assert one_host.count(R.NEW) == 64 and one_host.count(R.HOST_FULL) == 36
    fakes = [Identity.generate() for _ in range(4096)]
    results = [table.apply(_at(f, f"10.9.{i // 250}.{i % 250}"), 0.0, "mdns") for i, f in enumerate(fakes)]
    assert len(table) == 4096 and results.count(R.FULL) == 64
    real = Identity.generate()
    assert table.apply(_at(real, "192.168.1.20"), 1.0, "mdns", verified=True) is R.NEW
    assert real.node_id in {p.advert.node_id for p in table.snapshot(1.0)}
    assert len(table.take_evicted()) == 1
    # a silent fake leaves within the ttl cap whatever ttl it asked for
    assert [p.advert.node_id for p in table.snapshot(62.0)] == []
