"""PeerTable: the live membership view, one entry per node id, newest seq wins.

Pure logic: no I/O, no threads, the clock is passed in. The node feeds it validated adverts from mDNS
and libp2p; `simulations/` runs the very same code for 1000 nodes in one process, so `apply` is O(1)
(plus an O(log n) heap push) and `expire` only touches peers whose deadline has passed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from discovery.advert import NodeAdvert

DEFAULT_MAX_SKEW_S = 300.0


class ApplyResult(Enum):
    NEW = "new"  # first advert from this node
    UPDATED = "updated"  # higher seq than the stored one
    REFRESHED = "refreshed"  # same seq again: only last_seen moves
    STALE = "stale"  # lower seq than stored (or than its goodbye/expiry): a replay, rejected
    SELF = "self"  # our own advert echoed back
    FULL = "full"  # table at max_peers, new node refused

    @property
    def accepted(self) -> bool:
        return self in (ApplyResult.NEW, ApplyResult.UPDATED, ApplyResult.REFRESHED)


class TouchResult(Enum):
    """What a verified heartbeat (node id, seq, issued_at) did to the table."""

    REFRESHED = "refreshed"  # seq matches the stored advert, issued_at newer: last_seen moves
    DUPLICATE = "duplicate"  # same issued_at again (the same beat over another path): nothing to do
    STALE = "stale"  # older seq, or issued_at not newer than the last beat: a replay, rejected
    NEWER_SEQ = "newer_seq"  # the node has an advert we missed: fetch it
    UNKNOWN = "unknown"  # not in the table: the beat cannot be verified, ignore it
    SELF = "self"


@dataclass(frozen=True, slots=True)
class Peer:
    advert: NodeAdvert
    last_seen: float  # receiver's clock: expiry never depends on the sender's clock
    source: str  # "mdns" | "libp2p" | "static" | ...
    beat_at: float = float("-inf")  # sender's issued_at of the newest advert/beat accepted for this seq

    def last_seen_s(self, now: float) -> float:
        return max(0.0, now - self.last_seen)

    def expires_at(self) -> float:
        return self.last_seen + self.advert.ttl_s


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
    def __init__(self, self_id: str, *, max_peers: int = 4096) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.self_id = self_id
        self.max_peers = max_peers
        self._peers: dict[str, Peer] = {}
        # (expires_at, node_id) with lazy deletion: an entry is live only if it matches the peer now
        self._deadlines: list[tuple[float, str]] = []
        # last seq of departed (goodbye or expired) nodes, so a replay cannot resurrect them; capped FIFO
        self._departed: OrderedDict[str, int] = OrderedDict()
        self._max_departed = max_peers

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def apply(self, advert: NodeAdvert, now: float, source: str = "") -> ApplyResult:
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
            if len(self._peers) >= self.max_peers:
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
            advert=advert, last_seen=now, source=source or (old.source if old else ""), beat_at=beat_at
        )
        self._peers[node_id] = peer
        self._push_deadline(peer)
        return result

    def peek_touch(self, node_id: str, seq: int, issued_at: float) -> TouchResult:
        """What touch() would do, without doing it: lets the caller skip a signature check."""
        if node_id == self.self_id:
            return TouchResult.SELF
        peer = self._peers.get(node_id)
        if peer is None:
            return TouchResult.UNKNOWN
        if seq > peer.advert.seq:
            return TouchResult.NEWER_SEQ
        if seq < peer.advert.seq or issued_at < peer.beat_at:
            return TouchResult.STALE
        if issued_at == peer.beat_at:
            return TouchResult.DUPLICATE
        return TouchResult.REFRESHED

    def touch(self, node_id: str, seq: int, issued_at: float, now: float) -> TouchResult:
        """Applies a *verified* heartbeat: refreshes last_seen when it names the stored advert's seq
        and is newer than every liveness proof seen for it (so a captured beat cannot be replayed)."""
        result = self.peek_touch(node_id, seq, issued_at)
        if result is TouchResult.REFRESHED:
            old = self._peers[node_id]
            peer = Peer(advert=old.advert, last_seen=now, source=old.source, beat_at=issued_at)
            self._peers[node_id] = peer
            self._push_deadline(peer)
        return result

    def goodbye(self, node_id: str) -> bool:
        peer = self._peers.pop(node_id, None)
        if peer is None:
            return False
        self._remember_departed(node_id, peer.advert.seq)
        return True

    def expire(self, now: float) -> list[str]:
        """Drops peers whose last_seen + ttl_s < now; returns their ids."""
        gone: list[str] = []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            deadline, node_id = heapq.heappop(heap)
            peer = self._peers.get(node_id)
            if peer is not None and peer.expires_at() == deadline:
                del self._peers[node_id]
                self._remember_departed(node_id, peer.advert.seq)
                gone.append(node_id)
        return gone

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

    def _remember_departed(self, node_id: str, seq: int) -> None:
        self._departed[node_id] = seq
        self._departed.move_to_end(node_id)
        while len(self._departed) > self._max_departed:
            self._departed.popitem(last=False)
