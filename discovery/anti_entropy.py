"""Anti-entropy at rest (pure): which peer to ask, what our digest says, which adverts answer it.

Each EXCHANGE_EVERY_S a node sends one connected peer a digest of the (node id, seq, content tag)
it holds; the peer answers with the signed adverts (their owners' envelopes, unchanged) of nodes the
digest lacks, or names at an older seq *with other content*: a re-signed advert (new seq every 30 s,
same content) is not worth relaying. Relayed adverts go through Discovery.receive like first-hand
ones, so a relaying peer can forge nothing. Everything here is pure: clock, ids and data passed in.

Wire (inside the libp2p pnet + Noise connection, on the direct stream, never relayed):
  digest = msgpack [3, start: bin(16), end: bin(16), ids: bin(16 x n), seqs: [int] * n, tags: bin(4 x n)]
  answer = msgpack [4, [envelope: bin, ...]]
A digest covers the node ids in the circular range start..end (inclusive); `start == end` with
MAX_DIGEST_ENTRIES entries or fewer and `full` (end == start and n < cap) means all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack

from discovery.advert import NodeAdvert

EXCHANGE_EVERY_S = 10.0  # one digest per node per period: bounds the time to learn a missed peer
MAX_DIGEST_ENTRIES = 256  # ~7.5 KB: past it a digest covers a rotating part of the id space
MAX_ANSWER_ADVERTS = 8  # adverts relayed per answer, and accepted per exchange
MAX_ANSWER_BYTES = 16 * 1024  # = the direct stream's frame cap
ANSWER_WINDOW_S = 5.0  # an answer is taken only from the peer we asked, this long after asking
DIGEST_KIND, ANSWER_KIND = 3, 4  # envelopes are 1 (advert) and 2 (beat)
_ID_BYTES, _TAG_BYTES = 16, 4
MAX_SEQ = _MAX_INT = 2**63 - 1


class ExchangeError(ValueError):
    """A digest or answer that is not what we send: dropped and counted as `malformed`."""


@dataclass(frozen=True, slots=True)
class Version:
    node_id: str  # 32 lowercase hex
    seq: int
    tag: int  # content_tag of that advert; 0 when unknown (a node that left before we held its advert)


@dataclass(frozen=True, slots=True)
class Digest:
    start: str  # node id where the range begins (inclusive)
    end: str  # node id where it ends (inclusive)
    full: bool  # the range is the whole id space
    versions: tuple[Version, ...]

    def covers(self, node_id: str) -> bool:
        if self.full:
            return True
        if self.start <= self.end:
            return self.start <= node_id <= self.end
        return node_id >= self.start or node_id <= self.end  # wraps past ff..ff


def content_tag(advert: NodeAdvert) -> int:
    """4 bytes of the advert's content without seq, issued_at and load (re-signing and beats move those)."""
    d = advert.to_dict()
    for k in ("seq", "issued_at", "load"):
        d.pop(k, None)
    raw = msgpack.packb(d, use_bin_type=True)
    return int.from_bytes(hashlib.sha256(raw).digest()[:_TAG_BYTES], "big") or 1


def _round_hash(self_id: str, now: float, salt: bytes) -> bytes:
    rnd = int(now // EXCHANGE_EVERY_S)
    return hashlib.sha256(salt + self_id.encode() + rnd.to_bytes(8, "big")).digest()


def choose_partner(self_id: str, candidates: Sequence[str], now: float) -> str | None:
    """The peer (a libp2p peer id among those connected, sorted or not) to send this round's digest
    to: a different one each round, spread by a hash of our id and the round number."""
    if not candidates:
        return None
    ordered = sorted(candidates)
    return ordered[int.from_bytes(_round_hash(self_id, now, b"partner")[:8], "big") % len(ordered)]


def build_digest(self_id: str, held: Iterable[Version], now: float, cap: int = MAX_DIGEST_ENTRIES) -> Digest:
    """Our versions (and our own), from a start point that moves each round, at most `cap` of them."""
    ordered = sorted(held, key=lambda v: v.node_id)
    if len(ordered) < cap:
        zero = "0" * 32
        return Digest(zero, zero, True, tuple(ordered))
    start = _round_hash(self_id, now, b"start")[:_ID_BYTES].hex()
    first = next((i for i, v in enumerate(ordered) if v.node_id >= start), 0)
    picked = tuple((ordered[first:] + ordered[:first])[:cap])
    return Digest(start, picked[-1].node_id, False, picked)


def to_send(digest: Digest, held: Iterable[Version], cap: int = MAX_ANSWER_ADVERTS) -> list[str]:
    """Node ids whose adverts answer `digest`: those it lacks first, then those it names at an older
    seq with other content; only ids in its range; at most `cap`, in id order within each group."""
    theirs = {v.node_id: v for v in digest.versions}
    lacking: list[str] = []
    changed: list[str] = []
    for v in sorted(held, key=lambda v: v.node_id):
        if not digest.covers(v.node_id):
            continue
        t = theirs.get(v.node_id)
        if t is None:
            lacking.append(v.node_id)
        elif t.seq < v.seq and t.tag != v.tag:
            changed.append(v.node_id)
    return (lacking + changed)[:cap]


def encode_digest(d: Digest) -> bytes:
    vs = d.versions
    start = bytes.fromhex(d.start)
    end = start if d.full else bytes.fromhex(d.end)
    return msgpack.packb([DIGEST_KIND, start, end, b"".join(bytes.fromhex(v.node_id) for v in vs),
                          [v.seq for v in vs], b"".join(v.tag.to_bytes(_TAG_BYTES, "big") for v in vs)],
                         use_bin_type=True)


def encode_answer(envelopes: Sequence[bytes], max_bytes: int = MAX_ANSWER_BYTES) -> bytes | None:
    """Our answer frame with as many of `envelopes` as fit in max_bytes (None when none does)."""
    out: list[bytes] = []
    size = 16  # array headers and slack
    for env in envelopes[:MAX_ANSWER_ADVERTS]:
        if size + len(env) + 5 > max_bytes:
            break
        out.append(env)
        size += len(env) + 5
    return msgpack.packb([ANSWER_KIND, out], use_bin_type=True) if out else None


def is_exchange(data: bytes) -> bool:
    """Cheap test on a direct frame: a digest or answer (else an envelope, for Discovery.receive)."""
    return len(data) >= 2 and data[0] in (0x92, 0x96) and data[1] in (DIGEST_KIND, ANSWER_KIND)


def _unpack(data: bytes) -> list[object]:
    if len(data) > MAX_ANSWER_BYTES:
        raise ExchangeError("oversized")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0,
                              max_bin_len=MAX_ANSWER_BYTES, max_array_len=MAX_DIGEST_ENTRIES + 8,
                              max_map_len=0, max_str_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ExchangeError(f"undecodable: {e!r}") from None
    if not isinstance(msg, list) or not msg:
        raise ExchangeError("not an array")
    return msg


def decode_digest(data: bytes) -> Digest:
    msg = _unpack(data)
    if len(msg) != 6 or msg[0] != DIGEST_KIND:
        raise ExchangeError("digest shape")
    _, start, end, ids, seqs, tags = msg
    if not all(isinstance(x, bytes) for x in (start, end, ids, tags)) or not isinstance(seqs, list):
        raise ExchangeError("digest types")
    assert isinstance(start, bytes) and isinstance(end, bytes) and isinstance(ids, bytes) and isinstance(tags, bytes)
    n = len(seqs)
    if len(start) != _ID_BYTES or len(end) != _ID_BYTES or n > MAX_DIGEST_ENTRIES:
        raise ExchangeError("digest sizes")
    if len(ids) != n * _ID_BYTES or len(tags) != n * _TAG_BYTES:
        raise ExchangeError("digest lengths")
    if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= _MAX_INT for s in seqs):
        raise ExchangeError("digest seq")
    versions = tuple(
        Version(ids[i * _ID_BYTES:(i + 1) * _ID_BYTES].hex(), seqs[i],
                int.from_bytes(tags[i * _TAG_BYTES:(i + 1) * _TAG_BYTES], "big"))
        for i in range(n)
    )
    return Digest(start.hex(), end.hex(), start == end and n < MAX_DIGEST_ENTRIES, versions)


def decode_answer(data: bytes) -> list[bytes]:
    """The envelopes of an answer (each still to be validated by Discovery.receive), at most the cap."""
    msg = _unpack(data)
    if len(msg) != 2 or msg[0] != ANSWER_KIND or not isinstance(msg[1], list):
        raise ExchangeError("answer shape")
    if len(msg[1]) > MAX_ANSWER_ADVERTS or not all(isinstance(e, bytes) for e in msg[1]):
        raise ExchangeError("answer entries")
    return list(msg[1])
