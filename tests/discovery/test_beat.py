"""Heartbeats: codec and checks, PeerTable.touch (table-driven, fake clock), significant_change."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from disc_builders import make_advert

from discovery import envelope as e
from discovery.advert import AdvertError, Load, NodeAdvert
from discovery.beat import Beat, decode_message, encode_beat
from discovery.changes import significant_change
from discovery.envelope import encode_signed, mesh_key_from_secret
from discovery.identity import Identity
from discovery.peer_table import PeerTable, TouchResult

KEY = mesh_key_from_secret("beat-mesh")
ME, PEER = Identity.generate(), Identity.generate()


def test_beat_round_trip_is_small_and_signed() -> None:
    data = encode_beat(PEER, KEY, 42, 1000.5)
    assert len(data) < 200
    beat = decode_message(data, KEY)
    assert isinstance(beat, Beat) and (beat.node_id, beat.seq, beat.issued_at) == (PEER.node_id, 42, 1000.5)
    assert beat.verify(PEER.public_key_raw) and not beat.verify(ME.public_key_raw)
    assert isinstance(decode_message(encode_signed(make_advert(PEER), PEER, KEY), KEY), NodeAdvert)


def _sealed_beat(fields: object) -> bytes:
    return e.seal_envelope(e.BEAT_VERSION, msgpack.packb(fields), PEER, KEY)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode_beat(PEER, mesh_key_from_secret("other"), 1, 1.0), "other_mesh"),
        (_sealed_beat([PEER.node_id, 1]), "malformed"),
        (_sealed_beat([PEER.node_id.upper(), 1, 1.0]), "bad_type"),
        (_sealed_beat([PEER.node_id, -1, 1.0]), "bad_type"),
        (_sealed_beat([PEER.node_id, True, 1.0]), "bad_type"),
        (_sealed_beat([PEER.node_id, 1, "now"]), "bad_type"),
        (_sealed_beat([PEER.node_id, 1, float("nan")]), "bad_value"),
        (_sealed_beat([PEER.node_id, 1, 1.0, "x" * 600]), "oversized"),
        (b"\x94\x02", "malformed"),
    ],
    ids=[
        "other mesh",
        "short",
        "bad id",
        "negative seq",
        "bool seq",
        "str time",
        "nan time",
        "oversized",
        "junk",
    ],
)
def test_bad_beats_refused_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(AdvertError) as err:
        decode_message(data, KEY)
    assert err.value.reason == reason


def test_an_advert_signature_never_passes_as_a_beat() -> None:
    payload = msgpack.packb([PEER.node_id, 1, 1.0])
    forged = msgpack.packb(
        [e.BEAT_VERSION, payload, PEER.sign(e._SIGN_DOMAIN + payload), e._mac(KEY, payload, 2)]
    )
    beat = decode_message(forged, KEY)
    assert isinstance(beat, Beat) and not beat.verify(PEER.public_key_raw)


def _table(seq: int = 5, issued_at: float = 100.0) -> PeerTable:
    table = PeerTable(ME.node_id)
    table.apply(make_advert(PEER, seq=seq, issued_at=issued_at), now=100.0)
    return table


@pytest.mark.parametrize(
    ("node_id", "seq", "issued_at", "expected", "last_seen"),
    [
        (PEER.node_id, 5, 102.5, TouchResult.REFRESHED, 103.0),
        (PEER.node_id, 5, 100.0, TouchResult.DUPLICATE, 100.0),  # the advert's own time: nothing new
        (PEER.node_id, 5, 99.0, TouchResult.STALE, 100.0),  # older than the advert: a replay
        (PEER.node_id, 4, 102.5, TouchResult.STALE, 100.0),  # an older seq
        (PEER.node_id, 6, 102.5, TouchResult.NEWER_SEQ, 100.0),  # we missed an advert
        (Identity.generate().node_id, 5, 102.5, TouchResult.UNKNOWN, None),
        (ME.node_id, 5, 102.5, TouchResult.SELF, None),
    ],
    ids=["fresh", "duplicate", "replayed time", "old seq", "newer seq", "unknown", "self"],
)
def test_touch(
    node_id: str, seq: int, issued_at: float, expected: TouchResult, last_seen: float | None
) -> None:
    table = _table()
    assert table.peek_touch(node_id, seq, issued_at) is expected
    assert table.touch(node_id, seq, issued_at, now=103.0) is expected
    peer = table.get(node_id)
    assert (peer.last_seen if peer else None) == last_seen


def test_beats_keep_a_peer_alive_and_silence_expires_it() -> None:
    table = _table()
    now, issued = 100.0, 100.0
    for _ in range(10):  # 25 s of beats, every 2.5 s: well past ttl 10 s
        now, issued = now + 2.5, issued + 2.5
        assert table.touch(PEER.node_id, 5, issued, now) is TouchResult.REFRESHED
        assert table.expire(now) == []
    assert table.touch(PEER.node_id, 5, issued, now + 1) is TouchResult.DUPLICATE  # the replayed last beat
    assert table.expire(now + 10.0) == [] and table.expire(now + 10.1) == [PEER.node_id]
    assert table.touch(PEER.node_id, 5, issued, now + 20) is TouchResult.DUPLICATE  # a replay revives nothing
    assert table.get(PEER.node_id) is None


def _expired(seq: int = 5) -> PeerTable:
    """PEER's advert seq 5 at 100, beats until 110, silent since: expired at 120.1 (ttl 10 s)."""
    table = _table(seq)
    assert table.touch(PEER.node_id, seq, 110.0, now=110.0) is TouchResult.REFRESHED
    assert table.expire(120.1) == [PEER.node_id]
    return table


@pytest.mark.parametrize(
    ("seq", "issued_at", "expected", "listed"),
    [
        (5, 125.0, TouchResult.REVIVED, True),  # it was starved, not gone: back at its next beat
        (5, 110.0, TouchResult.DUPLICATE, False),  # the last beat we had, replayed
        (5, 108.0, TouchResult.STALE, False),  # older than the last beat we had
        (4, 125.0, TouchResult.STALE, False),  # an older seq
        (6, 125.0, TouchResult.NEWER_SEQ, False),  # an advert we never had: fetched (Discovery)
    ],
    ids=["fresh", "replayed last beat", "replayed older beat", "old seq", "newer seq"],
)
def test_a_beat_of_an_expired_peer(seq: int, issued_at: float, expected: TouchResult, listed: bool) -> None:
    table = _expired()
    peek = table.peek_touch(PEER.node_id, seq, issued_at)
    assert peek is (TouchResult.EXPIRED if expected is TouchResult.REVIVED else expected)
    held = table.held(PEER.node_id)
    assert held is not None and held.advert.public_key == PEER.public_key_raw  # the beat is checked against it
    assert table.touch(PEER.node_id, seq, issued_at, now=126.0, load=Load(1, 0, 4)) is expected
    peer = table.get(PEER.node_id)
    assert (peer is not None) is listed
    if peer is not None:
        assert (peer.last_seen, peer.beat_at, peer.advert.seq, peer.advert.load) == (126.0, 125.0, 5, Load(1, 0, 4))
        assert table.snapshot(126.0) == [peer] and table.expire(136.0) == [] and table.expire(136.1) == [PEER.node_id]


def test_no_beat_revives_a_peer_that_said_goodbye_or_was_replaced() -> None:
    table = _table()
    assert table.goodbye(PEER.node_id)
    assert table.touch(PEER.node_id, 5, 125.0, now=126.0) is TouchResult.UNKNOWN and table.held(PEER.node_id) is None
    table = _expired()
    assert table.apply(make_advert(PEER, seq=7, issued_at=121.0), now=121.0).accepted  # back by a new advert
    assert table.touch(PEER.node_id, 5, 125.0, now=126.0) is TouchResult.STALE  # its old seq stays old


def test_a_full_host_keeps_an_expired_peer_out_until_room() -> None:
    table = PeerTable(ME.node_id, max_per_host=1)  # every make_advert is on 127.0.0.1
    table.apply(make_advert(PEER, seq=5, issued_at=100.0), now=100.0)
    assert table.expire(110.1) == [PEER.node_id]
    other = Identity.generate()
    assert table.apply(make_advert(other, issued_at=111.0), now=111.0).accepted
    assert table.touch(PEER.node_id, 5, 112.0, now=112.0) is TouchResult.EXPIRED and table.get(PEER.node_id) is None
    assert table.goodbye(other.node_id)
    assert table.touch(PEER.node_id, 5, 113.0, now=113.0) is TouchResult.REVIVED


def test_a_same_seq_advert_does_not_rewind_the_beat_clock() -> None:
    table = _table()
    table.touch(PEER.node_id, 5, 110.0, now=110.0)
    table.apply(make_advert(PEER, seq=5, issued_at=100.0), now=111.0)  # replay of the advert itself
    assert table.peek_touch(PEER.node_id, 5, 105.0) is TouchResult.STALE


GIB = 1 << 30
BASE = make_advert(PEER, resources=dataclasses.replace(make_advert(PEER).resources, ram_free_bytes=8 * GIB))


def _with(**changes: object) -> NodeAdvert:
    res = {k: v for k, v in changes.items() if k.endswith("_bytes")}
    rest = {k: v for k, v in changes.items() if not k.endswith("_bytes")}
    return dataclasses.replace(BASE, resources=dataclasses.replace(BASE.resources, **res), **rest)


@pytest.mark.parametrize(
    ("new", "significant"),
    [
        (_with(seq=9, issued_at=5000.0), False),
        (_with(ram_free_bytes=8 * GIB - 200 * 2**20), False),  # jitter below 512 MiB (1/32 of 16 GiB)
        (_with(ram_free_bytes=7 * GIB), True),
        (_with(load=dataclasses.replace(BASE.load, active=1)), True),
        (_with(name="renamed"), True),
        (_with(models=()), True),
    ],
    ids=["seq and time", "free jitter", "free step", "load", "name", "models"],
)
def test_significant_change(new: NodeAdvert, significant: bool) -> None:
    assert significant_change(BASE, new) is significant
