"""Discovery and membership: signed adverts, the pure PeerTable, mDNS and libp2p transports.

`Discovery` (discovery/service.py) loads lazily: importing it pulls in py-libp2p (about 1.5 s), which
the simulator, using only PeerTable and NodeAdvert, never needs.
"""

from typing import Any

from discovery.advert import Addresses, AdvertError, FileAdvert, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import (
    MAX_ENVELOPE_BYTES,
    decode_signed,
    encode_signed,
    mesh_key_from_secret,
)
from discovery.peer_change import ChangeKind, PeerChange
from discovery.peer_table import ApplyResult, Peer, PeerTable, freshness_error

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "Addresses",
    "ChangeKind",
    "Discovery",
    "PeerChange",
    "AdvertError",
    "FileAdvert",
    "ApplyResult",
    "Load",
    "ModelAdvert",
    "NodeAdvert",
    "Peer",
    "PeerTable",
    "Resources",
    "decode_signed",
    "encode_signed",
    "freshness_error",
    "mesh_key_from_secret",
]


def __getattr__(name: str) -> Any:
    if name == "Discovery":
        from discovery import service

        return service.Discovery
    raise AttributeError(f"module 'discovery' has no attribute {name!r}")
