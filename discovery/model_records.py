"""Model-keyed membership records: who holds a model, found by key instead of by knowing every peer.

Past one LAN a node does not learn every peer. Each holder puts an entry under one key per model it
holds (`record_key(digest)`, the DHT key), and a gateway looks up only the keys of the models it
routes to (Petals keeps a key per block, with per-server entries that expire). Pure: no I/O, the clock
is passed in; the store is what one DHT key's replicas hold, the simulator runs it as the DHT.

Trust is the adverts' (docs/security.md): an entry's value is the holder's own signed, mesh-bound
advert envelope, and a reader hands every entry to `Discovery.receive` like any advert (signature,
mesh HMAC, id/key binding, freshness, seq). The store itself trusts nothing: it keys entries by the
node id the putter claims, caps entries per key and bytes per entry, and lets them expire, so a bad
member can at worst fill its own entries; a forged entry for another node fails at the reader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from discovery.advert import ModelAdvert
from discovery.envelope import MAX_ENVELOPE_BYTES

RECORD_TTL_S = 240.0  # an entry not put again within this long is gone (a crashed holder's, say)
RECORD_REPUT_S = 120.0  # holders put their entries again this often (and whenever their advert changes)
MAX_ENTRIES_PER_KEY = 1024  # a key's replicas keep at most this many holders
MAX_RESULTS = 8  # entries one lookup returns: a gateway tracks a bounded set of holders per model


def record_key(digest: str) -> str:
    """The DHT key of a model's holder entries (a digest's holders, whole or a layer range)."""
    return "/meshllm/holders/" + hashlib.sha256(digest.encode()).hexdigest()[:32]


def model_keys(models: Sequence[ModelAdvert]) -> list[str]:
    """The keys a holder provides: each model's digest and alias (a client names a model by either; an
    alias maps to a digest only through adverts, so a reader that knows none looks the alias up)."""
    return list(dict.fromkeys(record_key(name) for m in models for name in (m.digest, m.alias) if name))


def _rank(reader_id: str, node_id: str) -> int:
    """Rendezvous order: each reader sees its own spread of holders, so load spreads over them."""
    return int.from_bytes(hashlib.blake2b(f"{reader_id}|{node_id}".encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Entry:
    node_id: str
    value: bytes  # the holder's signed advert envelope (checked by the reader, not by the store)
    ranges: tuple[tuple[int, int], ...]  # layer ranges the putter claims for this key (for sampling)
    expires_at: float


class RecordStore:
    """What the replicas of the DHT keys hold: key -> {node id -> entry}, newest put wins, expiring."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES_PER_KEY) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._keys: dict[str, dict[str, Entry]] = {}

    def put(self, key: str, node_id: str, value: bytes, ranges: tuple[tuple[int, int], ...], now: float,
            ttl_s: float = RECORD_TTL_S) -> bool:
        """Stores (or replaces) node_id's entry; False when refused (oversized, or the key is full)."""
        if len(value) > MAX_ENVELOPE_BYTES or ttl_s <= 0:
            return False
        entries = self._keys.setdefault(key, {})
        if node_id not in entries and len(entries) >= self.max_entries:
            self._expire(entries, now)
            if len(entries) >= self.max_entries:
                return False
        entries[node_id] = Entry(node_id, value, ranges, now + min(ttl_s, RECORD_TTL_S))
        return True

    def remove(self, key: str, node_id: str) -> None:
        """A holder withdraws its entry (it unloaded the model, or said goodbye)."""
        self._keys.get(key, {}).pop(node_id, None)

    def get(self, key: str, reader_id: str, now: float, *, limit: int = MAX_RESULTS,
            exclude: frozenset[str] = frozenset()) -> list[Entry]:
        """One live entry per distinct layer range (so a pipeline can be covered, however many stages
        it has), then more up to `limit`, each group in the reader's rendezvous order."""
        entries = self._keys.get(key)
        if not entries:
            return []
        self._expire(entries, now)
        live = sorted((e for e in entries.values() if e.node_id not in exclude and e.node_id != reader_id),
                      key=lambda e: _rank(reader_id, e.node_id))
        picked: list[Entry] = []
        covered: set[tuple[int, int]] = set()
        for e in live:
            if not set(e.ranges) <= covered:
                picked.append(e)
                covered.update(e.ranges)
        for e in live:
            if len(picked) >= limit:
                break
            if e not in picked:
                picked.append(e)
        return picked

    def holders(self, key: str, now: float) -> int:
        entries = self._keys.get(key, {})
        return sum(1 for e in entries.values() if e.expires_at >= now)

    @staticmethod
    def _expire(entries: dict[str, Entry], now: float) -> None:
        for node_id in [n for n, e in entries.items() if e.expires_at < now]:
            del entries[node_id]


SAMPLE_PEERS = 2  # peers a node dials past one LAN: a random 2-out graph is connected (w.h.p.)
MAX_SAMPLE_CONNECTIONS = 3 * SAMPLE_PEERS  # a node takes no more sample dials than this (no hubs)


def sample_peers(candidates: list[str], self_id: str, k: int = SAMPLE_PEERS, salt: str = "") -> list[str]:
    """A bounded, stable sample of the peers a node knows: rendezvous order of (self, salt, peer)."""
    others = [c for c in candidates if c != self_id]
    return sorted(others, key=lambda c: _rank(f"{self_id}|{salt}", c))[:k]
