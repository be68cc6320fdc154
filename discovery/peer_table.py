"""PeerTable: the live membership view, one entry per node id, newest seq wins.

Pure logic: no I/O, no threads, the clock is passed in. The node feeds it validated adverts from mDNS
and libp2p; `simulations/` runs the very same code for 1000 nodes in one process, so `apply` is O(1)
(plus an O(log n) heap push) and `expire` only touches peers whose deadline has passed.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from discovery.advert import Load, NodeAdvert

DEFAULT_MAX_SKEW_S = 300.0
DEFAULT_MAX_PEERS = 4096
DEFAULT_MAX_PER_HOST = 64  # one machine (one advertised IP) may not fill the table
DEFAULT_MAX_TTL_S = 60.0  # an advert asking for longer is held this long without a refresh


class ApplyResult(Enum):
    NEW = "new"  # first advert from this node
    UPDATED = "updated"  # higher seq than the stored one
    REFRESHED = "refreshed"  # same seq again: only last_seen moves
    STALE = "stale"  # lower seq than stored (or than its goodbye/expiry): a replay, rejected
    SELF = "self"  # our own advert echoed back
    FULL = "full"  # table at max_peers (nothing expired or unverified to evict), new node refused
    HOST_FULL = "host_full"  # max_per_host entries already advertise this node's host

    @property
    def accepted(self) -> bool:
        return self in (ApplyResult.NEW, ApplyResult.UPDATED, ApplyResult.REFRESHED)


class TouchResult(Enum):
    """What a verified heartbeat (node id, seq, issued_at) did to the table."""

    REFRESHED = "refreshed"  # seq matches the stored advert, issued_at newer: last_seen moves
    DUPLICATE = "duplicate"  # same issued_at again (the same beat over another path): nothing to do
    STALE = "stale"  # older seq, or issued_at not newer than the last beat: a replay, rejected
    NEWER_SEQ = "newer_seq"  # the node has an advert we missed: fetch it
    # it expired here and the beat names the advert we held: check the beat against that advert's key
    # (PeerTable.held), then touch() puts the node back, as if its advert had come again
    EXPIRED = "expired"
    REVIVED = "revived"  # touch(): an expired node is back in the table
    UNKNOWN = "unknown"  # not in the table: the beat cannot be verified, ignore it
    SELF = "self"


@dataclass(frozen=True, slots=True)
class Peer:
    advert: NodeAdvert
    last_seen: float  # receiver's clock: expiry never depends on the sender's clock
    source: str  # "mdns" | "libp2p" | "static" | ...
    beat_at: float = float("-inf")  # sender's issued_at of the newest advert/beat accepted for this seq
    # heard from the address it advertises (not relayed, not only claimed): kept over unverified ones
    verified: bool = False
    ttl_s: float = DEFAULT_MAX_TTL_S  # the advert's ttl_s, capped by the table

    def last_seen_s(self, now: float) -> float:
        return max(0.0, now - self.last_seen)

    def expires_at(self) -> float:
        return self.last_seen + self.ttl_s


def advert_host(advert: NodeAdvert) -> str:
    """The host part of the advert's HTTP address ("" when it has none): the per-host cap's key."""
    return advert.addresses.http.rpartition(":")[0] if ":" in advert.addresses.http else advert.addresses.http


class _Issued(Protocol):
    @property
    def issued_at(self) -> float: ...


def freshness_error(advert: _Issued, now: float, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> str | None:
    """'stale' / 'future' when issued_at is further than max_skew_s from our clock, else None.

    Bounds how long a captured advert can be replayed; seq ordering (PeerTable) handles the rest.
    """
    if advert.issued_at < now - max_skew_s:
        return "stale"
    if advert.issued_at > now + max_skew_s:
        return "future"
    return None


class PeerTable:
    """Caps (finding 5 of issue 11: 4,096 fake members must not lock a real node out):

    * `max_peers` entries in all; when full, a new *verified* node evicts expired entries first, then
      the unverified entry heard from least recently; an unverified newcomer is refused (FULL);
    * `max_per_host` entries per advertised host (HOST_FULL), so one machine cannot fill the table;
    * ttl_s capped at `max_ttl_s`, so a silent entry leaves within a minute whatever it asked for.

    Evicted node ids are returned by `take_evicted()` (the owner reports them as departures).
    """

    def __init__(
        self,
        self_id: str,
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        max_per_host: int = DEFAULT_MAX_PER_HOST,
        max_ttl_s: float = DEFAULT_MAX_TTL_S,
    ) -> None:
        if max_peers < 1 or max_per_host < 1:
            raise ValueError("max_peers and max_per_host must be >= 1")
        if max_ttl_s <= 0:
            raise ValueError("max_ttl_s must be > 0")
        self.self_id = self_id
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self.max_ttl_s = max_ttl_s
        self._peers: dict[str, Peer] = {}
        self._per_host: dict[str, int] = {}
        self._evicted: list[str] = []
        # (expires_at, node_id) with lazy deletion: an entry is live only if it matches the peer now
        self._deadlines: list[tuple[float, str]] = []
        # last seq of departed (goodbye or expired) nodes, so a replay cannot resurrect them; capped FIFO
        self._departed: OrderedDict[str, int] = OrderedDict()
        # the last entry of nodes that expired (not said goodbye): a fresh signed beat naming its seq
        # puts one back (touch), else it waited up to FULL_REPUBLISH_S for a re-signed advert; capped FIFO
        self._expired: OrderedDict[str, Peer] = OrderedDict()
        self._max_departed = max_peers

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def held(self, node_id: str) -> Peer | None:
        """The node's entry, or its last one if it expired: the key its beats are checked against."""
        return self._peers.get(node_id) or self._expired.get(node_id)

    def apply(self, advert: NodeAdvert, now: float, source: str = "", *, verified: bool = False) -> ApplyResult:
        """`verified`: the advert came from the address it advertises (see Discovery.receive)."""
        node_id = advert.node_id
        if node_id == self.self_id:
            return ApplyResult.SELF
        old = self._peers.get(node_id)
        if old is None:
            departed_seq = self._departed.get(node_id)
            if departed_seq is not None:
                if advert.seq <= departed_seq:
                    return ApplyResult.STALE
                del self._departed[node_id]
                self._expired.pop(node_id, None)
            if self._per_host.get(advert_host(advert), 0) >= self.max_per_host:
                return ApplyResult.HOST_FULL
            if len(self._peers) >= self.max_peers and not self._make_room(now, verified):
                return ApplyResult.FULL
            result = ApplyResult.NEW
        elif advert.seq < old.advert.seq:
            return ApplyResult.STALE
        elif advert.seq == old.advert.seq:
            # same seq: keep the stored advert (first one wins), only the liveness moves
            advert, result = old.advert, ApplyResult.REFRESHED
        else:
            result = ApplyResult.UPDATED
        beat_at = (
            max(old.beat_at, advert.issued_at)
            if result is ApplyResult.REFRESHED and old
            else advert.issued_at
        )
        peer = Peer(
            advert=advert,
            last_seen=now,
            source=source or (old.source if old else ""),
            beat_at=beat_at,
            verified=verified or (old is not None and old.verified),
            ttl_s=min(advert.ttl_s, self.max_ttl_s),
        )
        self._put(node_id, peer)
        return result

    def take_evicted(self) -> list[str]:
        """Node ids dropped to make room since the last call (expired or unverified entries)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _make_room(self, now: float, verified: bool) -> bool:
        """Frees one slot for a newcomer: expired entries first, then (for a verified newcomer only)
        the unverified entry heard from least recently. O(n), only when the table is full."""
        gone = self.expire(now)
        self._evicted.extend(gone)
        if gone:
            return True
        if not verified:
            return False
        unverified = [p for p in self._peers.values() if not p.verified]
        if not unverified:
            return False
        victim = min(unverified, key=lambda p: p.last_seen).advert.node_id
        self._remove(victim)
        self._evicted.append(victim)
        return True

    def _put(self, node_id: str, peer: Peer) -> None:
        old = self._peers.get(node_id)
        if old is not None:
            self._count_host(advert_host(old.advert), -1)
        self._peers[node_id] = peer
        self._count_host(advert_host(peer.advert), +1)
        self._push_deadline(peer)

    def _remove(self, node_id: str) -> Peer | None:
        peer = self._peers.pop(node_id, None)
        if peer is not None:
            self._count_host(advert_host(peer.advert), -1)
            self._remember_departed(node_id, peer.advert.seq)
        return peer

    def _count_host(self, host: str, delta: int) -> None:
        count = self._per_host.get(host, 0) + delta
        if count > 0:
            self._per_host[host] = count
        else:
            self._per_host.pop(host, None)

    def peek_touch(self, node_id: str, seq: int, issued_at: float) -> TouchResult:
        """What touch() would do, without doing it: lets the caller skip a signature check."""
        if node_id == self.self_id:
            return TouchResult.SELF
        peer = self._peers.get(node_id)
        gone = None if peer is not None else self._expired.get(node_id)
        if gone is not None and self._departed.get(node_id) == gone.advert.seq:
            if seq == gone.advert.seq and issued_at > gone.beat_at:
                return TouchResult.EXPIRED
            peer = gone  # newer seq: fetch it; older or not newer than its last beat: a replay
        if peer is None:
            return TouchResult.UNKNOWN
        if seq > peer.advert.seq:
            return TouchResult.NEWER_SEQ
        if seq < peer.advert.seq or issued_at < peer.beat_at:
            return TouchResult.STALE
        if issued_at == peer.beat_at:
            return TouchResult.DUPLICATE
        return TouchResult.REFRESHED

    def touch(self, node_id: str, seq: int, issued_at: float, now: float, load: Load | None = None) -> TouchResult:
        """Applies a *verified* heartbeat: refreshes last_seen when it names the stored advert's seq
        and is newer than every liveness proof seen for it (so a captured beat cannot be replayed);
        a beat's `load` replaces the stored advert's load (the node signed both)."""
        result = self.peek_touch(node_id, seq, issued_at)
        if result is TouchResult.EXPIRED:
            gone = self._expired.pop(node_id)
            del self._departed[node_id]
            if not self.apply(gone.advert, now, gone.source, verified=gone.verified).accepted:
                self._remember_departed(node_id, seq, gone)  # full: it stays gone, its beats still count
                return result
            result = TouchResult.REVIVED
        if result in (TouchResult.REFRESHED, TouchResult.REVIVED):
            old = self._peers[node_id]
            advert = old.advert if load is None else dataclasses.replace(old.advert, load=load)
            self._put(node_id, dataclasses.replace(old, advert=advert, last_seen=now, beat_at=issued_at))
        return result

    def goodbye(self, node_id: str) -> bool:
        return self._remove(node_id) is not None

    def expire(self, now: float) -> list[str]:
        """Drops peers whose last_seen + ttl_s < now; returns their ids."""
        gone: list[str] = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            deadline, node_id = heapq.heappop(heap)
            peer = self._peers.get(node_id)
            if peer is not None and peer.expires_at() == deadline:
                self._remove(node_id)
                self._remember_departed(node_id, peer.advert.seq, peer)
                gone.append(node_id)
        return gone

    def departed_seqs(self) -> list[tuple[str, int]]:
        """(node id, last seq) of nodes that left or expired (what an anti-entropy digest names)."""
        return list(self._departed.items())

    def is_member(self, node_id: str, now: float) -> bool:
        peer = self._peers.get(node_id)
        return peer is not None and peer.expires_at() >= now

    def tls_certs(self, now: float) -> list[str]:
        """The data-plane certificates of the live members. Called from a gRPC core thread: it copies
        the values in one C call, so the loop may change the table meanwhile (RuntimeError at worst)."""
        return [p.advert.tls_cert for p in list(self._peers.values()) if p.advert.tls_cert and p.expires_at() >= now]

    def snapshot(self, now: float) -> list[Peer]:
        """Live peers at `now` (not yet expired, even if expire() has not run), sorted by node_id."""
        return sorted(
            (p for p in self._peers.values() if p.expires_at() >= now), key=lambda p: p.advert.node_id
        )

    def _push_deadline(self, peer: Peer) -> None:
        heapq.heappush(self._deadlines, (peer.expires_at(), peer.advert.node_id))
        # refreshes leave dead heap entries behind; rebuild before they dominate memory
        if len(self._deadlines) > 4 * len(self._peers) + 64:
            self._deadlines = [(p.expires_at(), nid) for nid, p in self._peers.items()]
            heapq.heapify(self._deadlines)

    def _remember_departed(self, node_id: str, seq: int, expired: Peer | None = None) -> None:
        """`expired`: the entry of a node that expired (a beat may revive it); else it said goodbye or
        was evicted, and only an advert of a newer seq brings it back."""
        self._departed[node_id] = seq
        self._departed.move_to_end(node_id)
        while len(self._departed) > self._max_departed:
            self._departed.popitem(last=False)
        self._expired.pop(node_id, None)
        if expired is not None:
            self._expired[node_id] = expired
            while len(self._expired) > self._max_departed:
                self._expired.popitem(last=False)
