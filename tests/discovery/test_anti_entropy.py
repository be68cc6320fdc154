"""Anti-entropy decisions (pure, table-driven) and the exchange's hostile-input rules."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from disc_builders import make_advert

from discovery.anti_entropy import (
    MAX_ANSWER_ADVERTS,
    MAX_DIGEST_ENTRIES,
    Digest,
    ExchangeError,
    Version,
    build_digest,
    choose_partner,
    content_tag,
    decode_answer,
    decode_digest,
    encode_answer,
    encode_digest,
    is_exchange,
    to_send,
)
from discovery.exchange import AntiEntropy
from discovery.identity import Identity
from discovery.peer_table import PeerTable


def vid(i: int) -> str:
    return f"{i:032x}"


def full(*versions: Version) -> Digest:
    return Digest(vid(0), vid(0), True, versions)


A, B, C = Version(vid(1), 5, 11), Version(vid(2), 5, 22), Version(vid(3), 5, 33)


@pytest.mark.parametrize(
    ("digest", "held", "want"),
    [
        (full(A, B, C), [A, B, C], []),  # in sync: nothing
        (full(A), [A, B, C], [vid(2), vid(3)]),  # lacking
        (full(A, Version(vid(2), 4, 22)), [A, B], []),  # older seq, same content (re-signed): not worth it
        (full(A, Version(vid(2), 4, 99)), [A, B], [vid(2)]),  # older seq, other content
        (full(A, Version(vid(2), 6, 99)), [A, B], []),  # theirs is newer: never send an older one back
        (full(Version(vid(3), 4, 1)), [A, B, C], [vid(1), vid(2), vid(3)]),  # lacking first, then changed
        (Digest(vid(2), vid(2), False, ()), [A, B, C], [vid(2)]),  # a partial digest: only its range
        (Digest(vid(3), vid(1), False, ()), [A, B, C], [vid(1), vid(3)]),  # a range wrapping past ff..ff
    ],
)
def test_to_send(digest: Digest, held: list[Version], want: list[str]) -> None:
    assert to_send(digest, held) == want


def test_to_send_is_capped() -> None:
    held = [Version(vid(i), 1, 1) for i in range(1, 50)]
    assert to_send(full(), held) == [vid(i) for i in range(1, MAX_ANSWER_ADVERTS + 1)]


def test_partner_rotates_over_candidates_and_is_deterministic() -> None:
    peers = [f"peer{i}" for i in range(4)]
    picks = [choose_partner(vid(7), peers, 10.0 * r) for r in range(40)]
    assert set(picks) == set(peers)  # every peer is asked over time
    assert picks == [choose_partner(vid(7), list(reversed(peers)), 10.0 * r) for r in range(40)]
    assert choose_partner(vid(7), peers, 10.0) == choose_partner(vid(7), peers, 19.9)  # one per round
    assert choose_partner(vid(7), [], 10.0) is None


def test_digest_round_trip_full_and_partial() -> None:
    small = [Version(vid(i), 2**40 + i, i + 1) for i in range(10)]
    d = build_digest(vid(99), small, 0.0)
    assert d.full and decode_digest(encode_digest(d)) == d
    big = [Version(hashlib.sha256(bytes([i % 256, i // 256])).hexdigest()[:32], i, i + 1)  # ids are uniform
           for i in range(3 * MAX_DIGEST_ENTRIES)]
    p = build_digest(vid(99), big, 0.0)
    assert not p.full and len(p.versions) == MAX_DIGEST_ENTRIES
    assert all(p.covers(v.node_id) for v in p.versions)
    assert decode_digest(encode_digest(p)) == p
    assert len(encode_digest(p)) < 16 * 1024  # one direct frame
    # the covered part moves from round to round, so every id is covered over a few rounds
    covered = {v.node_id for r in range(30) for v in build_digest(vid(99), big, 10.0 * r).versions}
    assert covered == {v.node_id for v in big}


def _digest(*fields: object) -> bytes:
    return msgpack.packb([3, *fields], use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"\x96\x03",  # truncated
        _digest(b"\0" * 16, b"\0" * 16, b"\0" * 16, [1, 2], b"\0" * 8),  # 1 id, 2 seqs
        _digest(b"\0" * 15, b"\0" * 16, b"", [], b""),  # short start
        _digest(b"\0" * 16, b"\0" * 16, b"\0" * 16, [-1], b"\0" * 4),  # negative seq
        _digest(b"\0" * 16, b"\0" * 16, b"\0" * 16, [True], b"\0" * 4),  # bool seq
        _digest(b"\0" * 16, b"\0" * 16, b"\0" * 16 * 300, list(range(300)), b"\0" * 4 * 300),  # over the cap
        _digest("x", b"\0" * 16, b"", [], b""),  # wrong type
    ],
)
def test_bad_digests_are_refused(data: bytes) -> None:
    with pytest.raises(ExchangeError):
        decode_digest(data)


def test_answers_capped_and_typed() -> None:
    assert decode_answer(encode_answer([b"a", b"b"]) or b"") == [b"a", b"b"]
    assert encode_answer([b"x" * 20_000]) is None  # nothing fits in a frame
    with pytest.raises(ExchangeError):
        decode_answer(msgpack.packb([4, [b"a"] * (MAX_ANSWER_ADVERTS + 1)]))
    with pytest.raises(ExchangeError):
        decode_answer(msgpack.packb([4, ["not bytes"]]))
    assert is_exchange(encode_answer([b"a"]) or b"") and is_exchange(encode_digest(full()))
    assert not is_exchange(msgpack.packb([1, b"p", b"s", b"m"]))  # an envelope


def test_content_tag_ignores_seq_issued_at_and_load() -> None:
    ident = Identity.generate()
    a = make_advert(ident, seq=1, issued_at=1.0)
    b = make_advert(ident, seq=9, issued_at=2.0, load=a.load.__class__(3, 1, 4))
    assert content_tag(a) == content_tag(b) != content_tag(make_advert(ident, name="other"))


class FakeHost:
    def __init__(self, peers: list[str]) -> None:
        self.connected_peers = peers
        self.sent: list[tuple[str, bytes]] = []

    def send_to(self, peer_id: str, data: bytes) -> None:
        self.sent.append((peer_id, data))


def test_answers_only_from_the_peer_asked_once_and_rate_limits() -> None:
    now = [1000.0]
    me = Identity.generate()
    got: list[bytes] = []
    rejects: list[str] = []
    ex = AntiEntropy(PeerTable(me.node_id), lambda: now[0], lambda d: got.append(d) or True,
                     lambda reason, _detail: rejects.append(reason))
    ex.host = host = FakeHost(["p1"])
    answer = encode_answer([b"env"]) or b""
    ex.on_frame(answer, "p1")  # not asked
    assert got == [] and rejects == ["unsolicited"]
    ex.ask()
    assert host.sent[0][0] == "p1" and decode_digest(host.sent[0][1]).full
    ex.on_frame(answer, "p2")  # someone else answering
    ex.on_frame(answer, "p1")
    ex.on_frame(answer, "p1")  # a second answer to one digest
    assert got == [b"env"] and rejects == ["unsolicited"] * 3
    # a peer asking again and again is answered once per half period
    ex.on_frame(encode_digest(full()), "p9")
    ex.on_frame(encode_digest(full()), "p9")
    ex.on_frame(b"\x96\x03\x00", "p9")
    assert rejects[-1] == "malformed"
