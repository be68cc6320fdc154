"""Which node should serve a request for a whole model: pure ranking over adverts.

This node serves its own users itself whenever it holds the model whole and has a free slot: another
node's advert is only a claim (it may be a member lying to read the prompts), and our own engine is
no claim (issue 11, finding 3). Among peers, score = load (active + queued, plus the requests this
gateway has in flight there, against capacity); a holder that failed recently is backed off exponentially; and
requests that share a conversation prefix go to the same holder among equally loaded ones
(rendezvous hashing), so that holder's KV cache already holds the prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from discovery.advert import NodeAdvert

MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class FailureRecord:
    count: int
    last_at: float


@dataclass(frozen=True, slots=True)
class HolderRanking:
    ranked: tuple[str, ...]  # node ids, best first; backed-off holders last
    saturated: tuple[str, ...]  # holders with no free capacity at all

    @property
    def any_holder(self) -> bool:
        return bool(self.ranked or self.saturated)


def backoff_s(count: int) -> float:
    return min(MAX_BACKOFF_S, 2.0 ** max(0, count - 1))


def holds_whole(advert: NodeAdvert, model_digest: str) -> bool:
    return any(m.digest == model_digest and m.whole for m in advert.models)


def _rendezvous(prefix_key: str, node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{prefix_key}|{node_id}".encode(), digest_size=8).digest(), "big")


def rank_holders(
    model_digest: str,
    peers: Sequence[NodeAdvert],
    self_node: NodeAdvert | None,
    now: float,
    recent_failures: Mapping[str, FailureRecord],
    *,
    inflight: Mapping[str, int] | None = None,
    prefix_key: str | None = None,
    affinity_slack: int = 1,
) -> HolderRanking:
    inflight = inflight or {}
    self_id = self_node.node_id if self_node is not None else None
    seen: set[str] = set()
    rows = []  # (backed_off, busy, capacity, node_id)
    saturated = []
    for advert in ([self_node] if self_node is not None else []) + list(peers):
        if advert.node_id in seen or not holds_whole(advert, model_digest):
            continue
        seen.add(advert.node_id)
        busy = advert.load.active + advert.load.queued
        if advert.node_id != self_id:
            busy += inflight.get(advert.node_id, 0)  # adverts lag; our own sends do not
        capacity = max(1, advert.load.capacity)
        if busy >= capacity:
            saturated.append(advert.node_id)
            continue
        failure = recent_failures.get(advert.node_id)
        backed_off = failure is not None and now < failure.last_at + backoff_s(failure.count)
        rows.append((backed_off, busy, capacity, advert.node_id))

    def score(row: tuple[bool, int, int, str]) -> float:
        _, busy, capacity, _ = row
        return busy / capacity

    mine = [r for r in rows if r[3] == self_id and not r[0]]  # a free slot here: no one else is asked first
    healthy = sorted((r for r in rows if not r[0] and r[3] != self_id), key=lambda r: (score(r), r[3]))
    if prefix_key is not None and healthy:
        least = min(r[1] for r in healthy)
        near = [r for r in healthy if r[1] <= least + affinity_slack]
        near.sort(key=lambda r: _rendezvous(prefix_key, r[3]), reverse=True)
        healthy = near + [r for r in healthy if r not in near]
    backed = sorted((r for r in rows if r[0]), key=lambda r: (score(r), r[3]))
    return HolderRanking(tuple(r[3] for r in mine + healthy + backed), tuple(sorted(saturated)))


def choose_holder(
    model_digest: str,
    peers: Sequence[NodeAdvert],
    self_node: NodeAdvert | None,
    now: float,
    recent_failures: Mapping[str, FailureRecord],
    *,
    inflight: Mapping[str, int] | None = None,
    prefix_key: str | None = None,
) -> str | None:
    ranking = rank_holders(
        model_digest, peers, self_node, now, recent_failures, inflight=inflight, prefix_key=prefix_key
    )
    return ranking.ranked[0] if ranking.ranked else None
