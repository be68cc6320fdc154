"""The book of a stage's sessions: a cap per peer, and idle deadlines from each session's step cadence.

KV slots are few (8 by default). One member must not hold them all: a peer may hold at most
`per_peer` sessions at once. A peer is the node id its client certificate proves under mTLS
(`peer_key`), so nodes sharing a machine or a NAT are told apart; without mTLS
(--insecure-data-plane) it is the host a call comes from, the only identity a member cannot choose,
and loopback hosts are exempt there (a cap by host cannot tell apart the processes of one machine). A
session whose next step is later than `IDLE_FACTOR` x its usual gap (at least `IDLE_FLOOR_S`) is
closed, freeing its slot (issue 11, finding 8). Pure; the clock is passed in.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from core.errors import Busy
from dataplane.rpc import peer_node_id

NODE_PREFIX = "node:"  # keys of peers known by node id; any other key is a host

IDLE_FLOOR_S = 10.0  # a session with a steady cadence is closed after this long without a step, at least
IDLE_FACTOR = 20.0
FIRST_STEP_S = 30.0  # from the header to the first activation (the previous stage's prompt step)
IDLE_CEILING_S = 30.0
FRAME_TIMEOUT_S = 5.0  # between the frames of one tensor


def per_peer_cap(max_sessions: int) -> int:
    """Three quarters of the slots (at least one): others always keep a quarter."""
    return max(1, max_sessions - max(1, max_sessions // 4)) if max_sessions > 1 else 1


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' / 'ipv6:[::1]:5678' -> the host part, the key of per-peer caps."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer  # unix sockets and others: the whole string


def peer_key(context: grpc.aio.ServicerContext) -> str:
    """Who a call counts against: 'node:<id>' when mTLS proved the client's node id, else its host."""
    node_id = peer_node_id(context)
    return NODE_PREFIX + node_id if node_id else peer_host(context.peer())


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.startswith("unix:")


@dataclass(slots=True)
class _Entry:
    peer: str
    last_step_at: float
    steps: int = 0
    gap_ewma_s: float = 0.0


@dataclass(slots=True)
class SessionBook:
    per_peer: int
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, _Entry] = field(default_factory=dict)

    def open(self, sid: str, peer: str) -> None:
        """Books `sid` for `peer`, or raises Busy when that peer already holds its share."""
        exempt = not peer.startswith(NODE_PREFIX) and is_loopback(peer)  # a host key on loopback only
        if not exempt and self.held_by(peer) >= self.per_peer:
            raise Busy(1, f"this peer already holds {self.per_peer} stage sessions here")
        self._sessions[sid] = _Entry(peer, self.clock())

    def close(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def step(self, sid: str) -> None:
        e = self._sessions.get(sid)
        if e is None:
            return
        now = self.clock()
        if e.steps >= 1:  # the first gap includes the previous stage's prompt step: not the cadence
            gap = now - e.last_step_at
            e.gap_ewma_s = gap if e.steps == 1 else 0.8 * e.gap_ewma_s + 0.2 * gap
        e.steps += 1
        e.last_step_at = now

    def idle_timeout_s(self, sid: str) -> float:
        """How long to wait for the session's next step before closing it."""
        e = self._sessions.get(sid)
        if e is None or e.steps <= 1:
            return FIRST_STEP_S  # no cadence yet: the other stages' prompt steps may be long
        return min(IDLE_CEILING_S, max(IDLE_FLOOR_S, IDLE_FACTOR * e.gap_ewma_s))

    def held_by(self, peer: str) -> int:
        return sum(1 for e in self._sessions.values() if e.peer == peer)

    def __len__(self) -> int:
        return len(self._sessions)
