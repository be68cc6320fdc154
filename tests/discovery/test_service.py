"""Discovery.receive, the single validation path: forged input is counted, good input fires events."""

from __future__ import annotations

import asyncio

import msgpack
from disc_builders import make_advert

from discovery import envelope as e  # its private helpers forge a correctly MACed envelope
from discovery.beat import encode_beat
from discovery.envelope import encode_signed, mesh_key_from_secret
from discovery.identity import Identity
from discovery.peer_table import PeerTable
from discovery.service import ChangeKind, Discovery, PeerChange

KEY = mesh_key_from_secret("svc-mesh")
ME, PEER, OTHER = Identity.generate(), Identity.generate(), Identity.generate()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_discovery(clock: Clock) -> tuple[Discovery, list[PeerChange]]:
    own = make_advert(ME)
    d = Discovery(ME, KEY, lambda: own, PeerTable(ME.node_id), clock=clock, mdns=False)
    changes: list[PeerChange] = []
    d.on_change(changes.append)
    return d, changes


def signed(identity: Identity, seq: int, issued_at: float = 1000.0, key: bytes = KEY, **kw: object) -> bytes:
    return encode_signed(make_advert(identity, seq=seq, issued_at=issued_at, **kw), identity, key)


def test_forged_and_replayed_are_counted_by_reason() -> None:
    clock = Clock()
    d, changes = make_discovery(clock)
    assert d.receive(signed(PEER, 5), "libp2p")
    bad = [
        (b"garbage", "malformed"),
        (b"\x90" * 20000, "oversized"),
        (signed(PEER, 6, key=mesh_key_from_secret("other")), "other_mesh"),
        (signed(PEER, 4), "replayed_seq"),
        (signed(PEER, 7, issued_at=0.0), "stale"),
        (signed(PEER, 7, issued_at=10_000.0), "future"),
    ]
    for data, _ in bad:
        assert not d.receive(data, "libp2p")
    # someone else's node id with one's own key
    env = msgpack.unpackb(signed(OTHER, 9))
    fields = msgpack.unpackb(env[1])
    fields["node_id"] = PEER.node_id
    payload = msgpack.packb(fields)
    forged = msgpack.packb([1, payload, OTHER.sign(e._SIGN_DOMAIN + payload), e._mac(KEY, payload)])
    assert not d.receive(forged, "mdns")
    expected = {reason: 1 for _, reason in bad} | {"id_mismatch": 1}
    assert d.rejects == expected
    assert [c.kind for c in changes] == [ChangeKind.JOINED]
    assert d.table.get(PEER.node_id).advert.seq == 5  # still serving the genuine advert


def test_events_updated_only_on_content_change_and_goodbye() -> None:
    clock = Clock()
    d, changes = make_discovery(clock)
    assert d.receive(signed(PEER, 1), "mdns")
    assert d.receive(signed(PEER, 2, issued_at=1001.0), "mdns")  # same content, newer seq: no event
    assert d.receive(signed(PEER, 3, name="renamed"), "mdns")
    assert not d.receive(signed(ME, 10), "mdns")  # our own echo: ignored, not a reject
    assert d.receive(signed(PEER, 4, ttl_s=0.0), "libp2p")  # signed goodbye
    assert not d.receive(signed(PEER, 3, name="renamed"), "mdns")  # cannot come back with an old seq
    assert [c.kind for c in changes] == [ChangeKind.JOINED, ChangeKind.UPDATED, ChangeKind.LEFT]
    assert changes[1].peer is not None and changes[1].peer.advert.name == "renamed"
    assert d.rejects == {"replayed_seq": 1}


def test_own_advert_seq_grows_and_goodbye_served_after_stop() -> None:
    async def main() -> None:
        clock = Clock()
        d, _ = make_discovery(clock)
        await d.start()
        await asyncio.sleep(0.4)  # the start-up publish
        first = msgpack.unpackb(msgpack.unpackb(d.signed_advert())[1])
        clock.now += 5.0
        assert msgpack.unpackb(msgpack.unpackb(d.signed_advert())[1]) == first  # nothing changed: same seq
        d.publish_soon()
        await asyncio.sleep(0.4)
        second = msgpack.unpackb(msgpack.unpackb(d.signed_advert())[1])
        assert second["seq"] > first["seq"] >= 1000 * 1000  # seq starts at wall-clock milliseconds
        await d.stop()
        bye = msgpack.unpackb(msgpack.unpackb(d.signed_advert())[1])
        assert bye["ttl_s"] == 0 and bye["seq"] > second["seq"]

    asyncio.run(main())


def test_expiry_loop_drops_silent_peer() -> None:
    async def main() -> None:
        clock = Clock()
        d, changes = make_discovery(clock)
        await d.start()
        try:
            assert d.receive(signed(PEER, 1), "mdns")
            clock.now += 10.5  # past ttl_s=10 with no refresh: as if SIGKILLed
            await asyncio.sleep(0.7)
            assert d.table.get(PEER.node_id) is None
            assert changes[-1] == PeerChange(ChangeKind.LEFT, PEER.node_id, None)
        finally:
            await d.stop()

    asyncio.run(main())


def test_a_peer_that_expired_here_is_back_at_its_next_beat() -> None:
    """Our loop or its was starved past ttl_s: its beats went on naming the advert we held. It used to
    stay out (beats of a node not in the table were ignored) until its next re-signed advert, up to
    FULL_REPUBLISH_S later; a fresh signed beat now puts it back at once."""
    clock = Clock()
    d, changes = make_discovery(clock)
    assert d.receive(signed(PEER, 5), "libp2p")
    assert d.receive(encode_beat(PEER, KEY, 5, 1002.5), "libp2p")
    clock.now += 13.0  # 10.5 s without a beat: past ttl_s=10
    assert d.expire_now() == [PEER.node_id]
    assert not d.receive(signed(PEER, 5), "libp2p")  # its advert again (a reopened stream): a replay
    assert not d.receive(encode_beat(PEER, KEY, 5, 1002.5), "libp2p")  # its last beat again: a replay
    assert not d.receive(encode_beat(OTHER, KEY, 5, 1013.0), "libp2p")  # signed by another key
    assert d.table.get(PEER.node_id) is None
    assert d.receive(encode_beat(PEER, KEY, 5, 1013.0), "libp2p")
    assert [p.advert.node_id for p in d.table.snapshot(clock.now)] == [PEER.node_id]
    assert [c.kind for c in changes] == [ChangeKind.JOINED, ChangeKind.LEFT, ChangeKind.JOINED]
    assert d.beats_unknown == 1 and d.rejects == {"replayed_seq": 1}  # OTHER's beat: no advert of OTHER held


def test_a_beat_of_an_expired_peer_naming_a_newer_seq_fetches_that_advert() -> None:
    clock = Clock()
    d, _ = make_discovery(clock)
    fetched: list[str] = []
    d.use_transports(None, None, lambda peer: fetched.append(peer.advert.node_id))
    assert d.receive(signed(PEER, 5), "libp2p")
    clock.now += 11.0
    assert d.expire_now() == [PEER.node_id]
    assert not d.receive(encode_beat(PEER, KEY, 6, 1011.0), "libp2p")
    assert fetched == [PEER.node_id]  # from the HTTP address of the advert we held (MissedAdverts)
