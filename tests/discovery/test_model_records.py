"""Model-keyed records: per-holder entries, expiry, bounded and range-covering lookups, caps, trust."""

from __future__ import annotations

import pytest

from discovery.model_records import MAX_RESULTS, RECORD_TTL_S, RecordStore, record_key, sample_peers

KEY = record_key("ab" * 32)


def _ids(entries: list) -> list[str]:
    return [e.node_id for e in entries]


def test_put_get_and_newest_put_wins() -> None:
    s = RecordStore()
    assert s.put(KEY, "a", b"v1", ((0, 32),), now=0.0)
    assert s.put(KEY, "a", b"v2", ((0, 32),), now=1.0)
    [e] = s.get(KEY, "reader", now=1.0)
    assert (e.node_id, e.value) == ("a", b"v2")


@pytest.mark.parametrize(("ttl_s", "at", "alive"), [(10.0, 9.0, True), (10.0, 11.0, False),
                                                    (600.0, RECORD_TTL_S - 1, True), (600.0, RECORD_TTL_S + 1, False)])
def test_entries_expire(ttl_s: float, at: float, alive: bool) -> None:
    s = RecordStore()
    s.put(KEY, "a", b"v", (), now=0.0, ttl_s=ttl_s)
    assert bool(s.get(KEY, "r", now=at)) is alive  # ttl capped at RECORD_TTL_S


def test_lookup_is_bounded_and_covers_every_range_first() -> None:
    s = RecordStore()
    for i in range(40):
        s.put(KEY, f"w{i:02d}", b"v", ((0, 80),), now=0.0)
    s.put(KEY, "stage1", b"v", ((0, 40),), now=0.0)
    s.put(KEY, "stage2", b"v", ((40, 80),), now=0.0)
    got = s.get(KEY, "reader", now=0.0)
    assert len(got) == MAX_RESULTS
    covered = {r for e in got for r in e.ranges}
    assert {(0, 40), (40, 80), (0, 80)} <= covered


def test_readers_see_different_spreads_and_exclusions_hold() -> None:
    s = RecordStore()
    for i in range(40):
        s.put(KEY, f"h{i}", b"v", ((0, 32),), now=0.0)
    a, b = _ids(s.get(KEY, "reader-a", now=0.0)), _ids(s.get(KEY, "reader-b", now=0.0))
    assert set(a) != set(b)
    assert "h3" not in _ids(s.get(KEY, "r", now=0.0, limit=40, exclude=frozenset({"h3"})))


def test_caps_refuse_oversized_and_full_keys() -> None:
    s = RecordStore(max_entries=2)
    assert not s.put(KEY, "a", b"x" * 20000, (), now=0.0)
    assert s.put(KEY, "a", b"v", (), now=0.0, ttl_s=5.0) and s.put(KEY, "b", b"v", (), now=0.0)
    assert not s.put(KEY, "c", b"v", (), now=1.0)
    assert s.put(KEY, "c", b"v", (), now=6.0)  # a's entry expired: room again


def test_sample_is_bounded_stable_and_excludes_self() -> None:
    ids = [f"n{i}" for i in range(100)]
    a = sample_peers(ids, "n7")
    assert len(a) == 2 and "n7" not in a and a == sample_peers(list(reversed(ids)), "n7")


def test_a_forged_entry_fails_the_advert_trust_rules() -> None:
    """The store keeps what the putter claims; the reader's Discovery.receive refuses forgeries."""
    import random

    from discovery.envelope import mesh_key_from_secret
    from discovery.peer_table import PeerTable
    from discovery.service import Discovery
    from simulations.sim_node import make_identity

    rng = random.Random(1)
    me, other = make_identity(rng), make_identity(rng)
    disc = Discovery(me, mesh_key_from_secret("m"), lambda: None, PeerTable(me.node_id),  # type: ignore[arg-type,return-value]
                     mdns=False, multicast=False, fetch_advert=lambda *a: None)  # type: ignore[arg-type,return-value]
    assert not disc.receive(b"\x94\x01" + b"junk", "dht")
    assert disc.rejects
    del other
