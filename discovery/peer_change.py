"""What Discovery tells the node about a member: joined, changed or left (no transports imported, so
the package can export it without loading py-libp2p)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from discovery.peer_table import Peer


class ChangeKind(Enum):
    JOINED = "joined"
    UPDATED = "updated"  # content changed (not just seq/issued_at)
    LEFT = "left"  # goodbye or expiry


@dataclass(frozen=True, slots=True)
class PeerChange:
    kind: ChangeKind
    node_id: str
    peer: Peer | None  # None when LEFT
