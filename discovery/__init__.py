"""Discovery and membership: signed adverts, the pure PeerTable, mDNS and libp2p transports."""

from discovery.advert import Addresses, AdvertError, Load, ModelAdvert, NodeAdvert, Resources
from discovery.envelope import (
    DEFAULT_MESH_SECRET,
    MAX_ENVELOPE_BYTES,
    decode_signed,
    encode_signed,
    mesh_key_from_secret,
)
from discovery.peer_table import ApplyResult, Peer, PeerTable, freshness_error

__all__ = [
    "DEFAULT_MESH_SECRET",
    "MAX_ENVELOPE_BYTES",
    "Addresses",
    "AdvertError",
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
