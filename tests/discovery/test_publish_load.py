"""Load changes are published bounded: publish_kind (pure) and a Publisher under a burst of requests."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from disc_builders import make_advert

from discovery.advert import AdvertError, Load, ModelAdvert, NodeAdvert
from discovery.beat import Beat, decode_message, encode_beat
from discovery.envelope import BEAT_VERSION, mesh_key_from_secret, seal_envelope
from discovery.identity import Identity
from discovery.peer_table import PeerTable
from discovery.publisher import FULL_REPUBLISH_S, MIN_LOAD_ADVERT_S, Publisher, load_level, publish_kind

CAP4 = 4


@pytest.mark.parametrize(
    ("active", "queued", "capacity", "level"),
    [(0, 0, 4, 0), (1, 0, 4, 1), (2, 0, 4, 2), (3, 0, 4, 2), (4, 0, 4, 3), (1, 1, 4, 3), (0, 0, 0, 0), (1, 0, 0, 3)],
)
def test_load_level(active: int, queued: int, capacity: int, level: int) -> None:
    assert load_level(Load(active, queued, capacity)) == level


def _with_load(active: int, **changes: object):  # type: ignore[no-untyped-def]
    return dataclasses.replace(BASE, load=Load(active, 0, CAP4), **changes)


BASE = make_advert()


def _with_free(free: int) -> NodeAdvert:
    return dataclasses.replace(_with_load(0), resources=dataclasses.replace(BASE.resources, ram_free_bytes=free))
OTHER_MODEL = (ModelAdvert("cd" * 32, "other", 30, 0, 30, "llama.cpp", 2048),)


@pytest.mark.parametrize(
    ("new", "last_load", "forced", "periodic", "now", "load_sent_at", "kind"),
    [
        (_with_load(0), None, True, False, 100.0, 0.0, "change"),  # publish_soon: always
        (_with_load(0, models=OTHER_MODEL), None, False, False, 100.0, 0.0, "change"),  # content: always
        (_with_free(4 << 30), None, False, False, 100.0, 0.0, "full"),  # free memory alone: direct, no flood
        (_with_load(3), None, False, True, 100.0, 0.0, "beat"),  # load alone never makes a new advert
        (_with_load(0), None, False, True, 100.0, 0.0, "beat"),
        (_with_load(1), None, False, False, 100.0, 100.0 - MIN_LOAD_ADVERT_S, "load"),  # level 0 -> 1
        (_with_load(1), None, False, False, 100.0, 99.5, "defer"),  # ... too soon after the last load beat
        (_with_load(0), None, False, False, 100.0, 0.0, "none"),  # a wake with nothing new
        (_with_load(3), Load(2, 0, CAP4), False, False, 100.0, 0.0, "none"),  # peers heard level 2 already
        (_with_load(0), Load(4, 0, CAP4), False, False, 100.0, 0.0, "load"),  # back to idle: say so
    ],
)
def test_publish_kind(new, last_load, forced, periodic, now, load_sent_at, kind) -> None:  # type: ignore[no-untyped-def]
    got = publish_kind(_with_load(0), new, last_load=last_load, forced=forced, periodic=periodic, now=now,
                       full_sent_at=now - 1, load_sent_at=load_sent_at)
    assert got == kind


@pytest.mark.parametrize(("new", "periodic", "kind"), [
    (_with_load(0), False, "full"),  # a newcomer: our advert, direct and multicast, not gossiped
    (_with_load(0), True, "full"),
    (_with_load(0, models=OTHER_MODEL), False, "change"),  # a real change is gossiped all the same
])
def test_introduce_is_a_full_advert_never_a_flood(new, periodic, kind) -> None:  # type: ignore[no-untyped-def]
    got = publish_kind(_with_load(0), new, last_load=None, forced=False, periodic=periodic, now=100.0,
                       full_sent_at=99.0, load_sent_at=0.0, introduce=True)
    assert got == kind


def test_full_republish_is_due() -> None:
    got = publish_kind(_with_load(2), _with_load(3), last_load=None, forced=False, periodic=True, now=100.0,
                       full_sent_at=100.0 - FULL_REPUBLISH_S, load_sent_at=0.0)
    assert got == "full"


class _Host:
    addrs = ("/ip4/127.0.0.1/tcp/1/p2p/QmX",)

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.direct: list[tuple[bytes, bool]] = []

    def publish(self, data: bytes) -> None:
        self.published.append(data)

    def send_direct(self, data: bytes, full: bool, skip: frozenset[str] = frozenset()) -> None:
        self.direct.append((data, full))


def test_a_burst_of_requests_rides_on_beats() -> None:
    """100 request starts/ends over 10 s (a wake each, as the daemon's load callback does) plus the
    periodic ticks: one full advert (the first), extra beats bounded by MIN_LOAD_ADVERT_S; a receiving
    PeerTable sees each load level within MIN_LOAD_ADVERT_S + debounce, and the exact load a period later."""
    ident, key, now = Identity.generate(), mesh_key_from_secret("t"), [1000.0]
    load = [Load(0, 0, CAP4)]
    pub = Publisher(ident, key, lambda: dataclasses.replace(BASE, load=load[0]), PeerTable(ident.node_id),
                    clock=lambda: now[0], ttl_s=10.0, refresh_s=2.5)
    host, table, seen = _Host(), PeerTable("f" * 32), [0]

    def deliver() -> None:
        for data, _ in host.direct[seen[0]:]:
            m = decode_message(data, key)
            if isinstance(m, Beat):
                assert m.verify(ident.public_key_raw)
                table.touch(m.node_id, m.seq, m.issued_at, now[0], m.load)
            else:
                table.apply(m, now[0], "libp2p")
        seen[0] = len(host.direct)

    pub.libp2p = host  # type: ignore[assignment]
    pub.publish_once()  # the first advert: a change
    deliver()
    next_tick, step, debounce = now[0] + 2.5, 0.1, 0.2
    level_since, worst_lag = now[0], 0.0
    for i in range(100):
        now[0] += step
        before = load_level(load[0])
        load[0] = Load(i % 5, 0, CAP4)  # levels 0, 1, 2, 2, 3 over and over
        if load_level(load[0]) != before:
            level_since = now[0]
        pub.load_changed()
        due = pub.load_due_at()
        if due is None or now[0] >= due:
            pub.publish_once(periodic=False)
        if now[0] >= next_tick:
            pub.publish_once(periodic=True)
            next_tick += 2.5
        deliver()
        peer = table.get(ident.node_id)
        assert peer is not None
        if load_level(peer.advert.load) != load_level(load[0]):
            worst_lag = max(worst_lag, now[0] - level_since)
    span_s = 100 * step
    assert len(host.published) == 1 and sum(full for _, full in host.direct) == 1  # load: no advert, no flood
    assert len(host.direct) <= 1 + span_s / MIN_LOAD_ADVERT_S + span_s / 2.5 + 1
    assert worst_lag <= MIN_LOAD_ADVERT_S + debounce
    now[0] += 2.5
    pub.publish_once(periodic=True)  # the next period carries the exact load
    deliver()
    peer = table.get(ident.node_id)
    assert peer is not None and peer.advert.load == load[0]
    assert len(encode_beat(ident, key, 2**40, 1e9, Load(2**31 - 1, 2**31 - 1, 2**31 - 1))) < 200


def _sealed(ident: Identity, key: bytes, fields: object) -> bytes:
    return seal_envelope(BEAT_VERSION, msgpack.packb(fields), ident, key)


@pytest.mark.parametrize(
    ("load", "reason"),
    [("x", "malformed"), ([1, 2], "malformed"), ([1, 2, -1], "bad_type"), ([True, 0, 4], "bad_type"),
     ([0, 0, 2**31], "bad_type"), ([0, 0, 1.5], "bad_type")],
)
def test_bad_beat_loads_refused(load: object, reason: str) -> None:
    ident, key = Identity.generate(), mesh_key_from_secret("t")
    with pytest.raises(AdvertError) as err:
        decode_message(_sealed(ident, key, [ident.node_id, 1, 1.0, load]), key)
    assert err.value.reason == reason
    beat = decode_message(_sealed(ident, key, [ident.node_id, 1, 1.0, [1, 0, 4]]), key)
    assert isinstance(beat, Beat) and beat.load == Load(1, 0, 4)
